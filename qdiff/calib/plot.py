"""A readable PNG heatmap of a sensitivity table, drawn with Pillow only (no matplotlib dependency).

One row per layer (name, group), one column per candidate (``w2 w4 w8 a4 a8``). Each cell shows the
score and is coloured by its loss on a log scale (:func:`qdiff.calib.allocate.score_to_loss`):
dark blue = harmless, yellow = most sensitive in the table. Chosen plan bits, when given, are outlined.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from qdiff.calib.allocate import score_to_loss
from qdiff.calib.table import SensitivityTable
from qdiff.config.plan import Plan

_ROW, _CELL, _NAME = 14, 64, 420
# A short perceptual ramp (viridis-like), interpolated linearly.
_RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _colour(t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, t)) * (len(_RAMP) - 1)
    i = min(int(t), len(_RAMP) - 2)
    f = t - i
    a, b = _RAMP[i], _RAMP[i + 1]
    return tuple(int(round(a[k] + (b[k] - a[k]) * f)) for k in range(3))


def render(table: SensitivityTable, plan: Plan | None = None, title: str = "") -> Image.Image:
    """The heatmap as a PIL image."""
    cols = table.columns()
    font = ImageFont.load_default()
    header = 3 * _ROW
    img = Image.new("RGB", (_NAME + _CELL * len(cols) + 8, header + _ROW * (len(table.rows) + 2)), "white")
    draw = ImageDraw.Draw(img)
    logs = []
    for r in table.rows:
        metric = "ssim" if r["metric"] == "ssim" else "sqnr"
        logs += [math.log10(max(score_to_loss(v, metric), 1e-30)) for k in ("w", "a") for v in r[k].values()]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 1.0)
    draw.text(
        (4, 2),
        title or f"sensitivity ({table.meta.get('mode', '?')} mode): colour = log loss",
        fill="black",
        font=font,
    )
    draw.text((4, 2 + _ROW), "score per candidate (SSIM or SQNR dB, higher = less sensitive)", fill="gray", font=font)
    for j, c in enumerate(cols):
        draw.text((_NAME + j * _CELL + 4, 2 + 2 * _ROW), c, fill="black", font=font)
    for i, r in enumerate(table.rows):
        y = header + i * _ROW
        name = r["name"] if len(r["name"]) <= 62 else "..." + r["name"][-59:]
        draw.text((4, y + 1), f"{r['group'][0].upper()} {name}", fill="black", font=font)
        metric = "ssim" if r["metric"] == "ssim" else "sqnr"
        chosen = plan.layers.get(r["name"]) if plan is not None else None
        for j, c in enumerate(cols):
            v = r[c[0]].get(c[1:])
            x = _NAME + j * _CELL
            if v is None:
                continue
            t = (math.log10(max(score_to_loss(v, metric), 1e-30)) - lo) / ((hi - lo) or 1.0)
            fill = _colour(t)
            draw.rectangle([x, y, x + _CELL - 2, y + _ROW - 2], fill=fill)
            text = f"{v:.4f}" if metric == "ssim" else f"{v:.1f}"
            draw.text((x + 3, y + 1), text, fill="black" if t > 0.5 else "white", font=font)
            bits = None if chosen is None else (chosen.w_bits if c[0] == "w" else chosen.a_bits)
            if bits is not None and str(bits) == c[1:]:
                draw.rectangle([x, y, x + _CELL - 2, y + _ROW - 2], outline="red", width=2)
    y = header + (len(table.rows) + 0.5) * _ROW
    draw.text(
        (4, y), "C = content group, Q = quality group; red outline = bits chosen by the plan", fill="gray", font=font
    )
    return img


def save_png(table: SensitivityTable, path: str | Path, plan: Plan | None = None, title: str = "") -> Path:
    """Render and write the heatmap atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    render(table, plan, title).save(tmp, format="PNG")
    tmp.replace(path)
    return path
