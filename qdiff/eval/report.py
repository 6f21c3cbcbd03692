"""Write an :class:`~qdiff.eval.run.EvalResult`: ``report.json``, ``report.md`` (a table) and ``grid.png``."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qdiff.errors import QdiffError
from qdiff.eval.run import EvalResult
from qdiff.utils.perms import give_usual_mode

# (key, column title, format); metrics not measured for any variant are left out of the table
COLUMNS = (
    ("denoiser_mib", "denoiser MiB", "{:.2f}"),
    ("clip_score", "CLIP score", "{:.2f}"),
    ("quality", "quality", "{:.2f}"),
    ("acc_shape", "shape acc", "{:.3f}"),
    ("acc_colour", "colour acc", "{:.3f}"),
    ("acc_size", "size acc", "{:.3f}"),
    ("acc_position", "position acc", "{:.3f}"),
    ("shapes_fid", "Shapes-FID", "{:.1f}"),
    ("ssim", "SSIM vs ref", "{:.4f}"),
    ("psnr", "PSNR vs ref dB", "{:.2f}"),
    ("s_per_image", "s / image", "{:.4f}"),
)


def markdown_table(result: EvalResult) -> str:
    """One row per variant (and the real-render row for Shapes prompts), one column per measured metric."""
    cols = [c for c in COLUMNS if any(c[0] in m for m in result.metrics.values())]
    lines = ["| variant | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in result.metrics.items():
        cells = []
        for key, _, fmt in cols:
            v = m.get(key)
            cells.append("-" if v is None else ("inf" if isinstance(v, float) and math.isinf(v) else fmt.format(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_image(result: EvalResult, rows: int = 8, scale: int = 2) -> Image.Image:
    """Rows = the first ``rows`` prompts, columns = variants (same seed per row), with a header of variant names."""
    names = list(result.images)
    if not names:
        raise QdiffError("eval: no images to put in a grid")
    first = result.images[names[0]]
    n = min(rows, first.shape[0])
    h, w = first.shape[-2] * scale, first.shape[-1] * scale
    header, pad = 16, 4
    canvas = Image.new("RGB", (len(names) * (w + pad) + pad, header + n * (h + pad) + pad), (150, 150, 150))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        x = pad + c * (w + pad)
        draw.text((x, 2), name[: max(4, w // 6)], fill="white")
        for r in range(n):
            arr = (result.images[name][r].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(tile, (x, header + pad + r * (h + pad)))
    return canvas


def markdown_report(result: EvalResult, command: str | None = None) -> str:
    meta = result.meta
    s = meta.get("sampler", {})
    lines = [
        "# qdiff eval",
        "",
        f"{len(result.prompts)} prompts, seeds {result.seeds[0]}..{result.seeds[-1]}, {s.get('steps')} steps, "
        f"guidance {s.get('guidance_scale')}; SSIM/PSNR vs `{meta.get('reference')}` (same prompts and seeds).",
        f"Scorers: {', '.join(f'{k} = {v}' for k, v in meta.get('scorers', {}).items())}; Shapes metrics: "
        f"{'yes' if meta.get('shapes_metrics') else 'no'}. Machine: {meta.get('machine')}, torch {meta.get('torch')}.",
        "",
        markdown_table(result),
        "",
    ]
    if "real renders" in result.metrics:
        lines += ["`real renders`: fresh procedural renders of the same captions (the classifier's ceiling; its "
                  "Shapes-FID is real vs real, the noise floor at this many images).", ""]  # fmt: skip
    rows = min(8, len(result.prompts))
    lines += [f"`grid.png`: columns are the variants above, rows the first {rows} prompts (same seed per row):", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(result.prompts[:rows])] + [""]
    lines += [f"- {n}" for n in result.notes]
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines).rstrip() + "\n"


def save_report(result: EvalResult, out: str | Path, overwrite: bool = False, command: str | None = None) -> Path:
    """Write ``report.json``, ``report.md`` and ``grid.png`` into ``out`` atomically (temp folder + rename)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise QdiffError(f"output folder {out} already exists (use --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        give_usual_mode(tmp, directory=True)
    except OSError as exc:
        raise QdiffError(f"cannot write {out}: {exc.strerror}") from None
    try:
        data = result.to_dict()
        if command:
            data["command"] = command
        (tmp / "report.json").write_text(json.dumps(data, indent=1) + "\n")
        (tmp / "report.md").write_text(markdown_report(result, command))
        grid_image(result).save(tmp / "grid.png")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
