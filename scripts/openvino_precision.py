"""Which OpenVINO component may run its float parts in bf16? (docs/openvino.md, "Precision of the float parts")

    python scripts/openvino_precision.py --source out/shapes-w8a8-static --num-prompts 64 \
        --out docs/results/openvino-precision.md

Writes the OpenVINO folder of ``--source`` (a qdiff export, or ``builtin:shapes`` for the float model) into a temp
folder, then draws the same held-out Shapes prompts and seeds with every float part in f32, with each component
alone in bf16, and with all of them in bf16; reports SSIM / PSNR vs the all-f32 images (and vs qdiff's torch run of
the same export) and seconds per image (best of ``--rounds`` interleaved rounds). The defaults in
``qdiff/engines/openvino/precision.py`` come from this table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from qdiff.bench.report import write_atomic
    from qdiff.calib.metrics import psnr, ssim
    from qdiff.config.dtypes import cpu_bf16_native
    from qdiff.config.recipe import Recipe
    from qdiff.engines.openvino.export import export_openvino
    from qdiff.engines.openvino.runtime import load_openvino, read_ov_manifest
    from qdiff.export.resolve import load_pipeline, place
    from qdiff.sampling.draw import draw
    from qdiff.sampling.prompts import load_prompts
    from qdiff.utils.machine import cpu_flags

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="builtin:shapes", help="qdiff export or float model spec")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)

    sampler = Recipe.load("shapes-w8a8").sampler
    prompts = load_prompts("shapes-heldout", args.num_prompts)
    seeds = list(range(len(prompts)))
    with tempfile.TemporaryDirectory(prefix="qdiff-ov-precision-") as tmp:
        folder = export_openvino(args.source, Path(tmp) / "ov", progress=False)
        components = list(read_ov_manifest(folder)["components"])
        one = {f"{c} bf16": {**dict.fromkeys(components, "f32"), c: "bf16"} for c in components}  # the rest f32
        settings = {"all f32": "f32", **one, "all bf16": "bf16"}
        pipes = {name: load_openvino(folder, precision=value) for name, value in settings.items()}
        torch_pipe = load_pipeline(args.source)
        place(torch_pipe, "cpu")
        images, times = {}, {name: float("inf") for name in pipes}
        for _ in range(args.rounds):  # interleaved: every setting once per round
            for name, pipe in pipes.items():
                start = time.perf_counter()
                images[name] = draw(pipe, prompts, seeds, sampler, 16)
                times[name] = min(times[name], (time.perf_counter() - start) / len(prompts))
        reference = draw(torch_pipe, prompts, seeds, sampler, 16)
    base = images["all f32"]
    native = cpu_bf16_native(cpu_flags())
    lines = [
        f"OpenVINO float-part precision, `{args.source}`: {len(prompts)} Shapes held-out prompts, seeds 0.."
        f"{len(prompts) - 1} (`python scripts/openvino_precision.py --source {args.source} --num-prompts "
        f"{args.num_prompts}`), {platform.processor() or platform.machine()}, bf16 native: {native}.",
        "",
        "| setting | SSIM vs all-f32 | PSNR vs all-f32 dB | SSIM vs torch | s / image |",
        "|---|---|---|---|---|",
    ]
    for name, imgs in images.items():
        same = name == "all f32"
        s_ref = "-" if same else f"{float(ssim(imgs, base).mean()):.4f}"
        p_ref = "-" if same else f"{float(psnr(imgs, base)):.2f}"
        s_torch = float(ssim(imgs, reference).mean())
        lines.append(f"| {name} | {s_ref} | {p_ref} | {s_torch:.4f} | {times[name]:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
