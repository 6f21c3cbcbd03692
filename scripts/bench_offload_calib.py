"""Peak RSS and wall time of ``qdiff calibrate`` with and without ``--offload sequential`` (issue #11 item 4).

    python scripts/bench_offload_calib.py                       # a ~0.3 GB-fp32 UNet fixture in /work/scratch
    python scripts/bench_offload_calib.py --channels 64,128 --keep   # smaller / keep the fixture
    python scripts/bench_offload_calib.py --model DIR --recipe mixdq-w4a8   # any diffusers pipeline folder

Each run is a fresh ``qdiff calibrate`` SUBPROCESS (as ``scripts/bench_memory.py``): its peak RSS is the kernel's
``ru_maxrss`` of that child (``os.wait4``), so the interpreter, imports, the text encoder, the VAE and every
transient count; the child is killed if the machine drops under 3 GiB available. On the CPU ``--offload sequential``
keeps the denoiser's blocks in the checkpoint on disk and reads one at a time (``qdiff.calib.offload``), so the
difference between the rows is about the blocks' float bytes minus two blocks; the time column is the price of
reading every block at every denoiser call. Both runs must write the same ``plan.json`` and ranges (checked here).

The default fixture is the tiny-sd pipeline (its CLIP text encoder, VAE, tokenizer, scheduler) with a UNet of the
SD layout at ``--channels`` widths and random weights (float32 on disk), calibrated with a fast local-proxy recipe
(1 step, 1 prompt) so that the sensitivity pass stays short. Timings are only meaningful on an otherwise idle
machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
CLI = "import sys; from qdiff.cli import main; sys.exit(main(sys.argv[1:]))"  # `qdiff` without the entry point


def compare_ranges(a: Path, b: Path) -> str:
    """How two ``ranges.safetensors`` differ: identical, or how many tensors differ and by how much.

    An offloaded run reads its blocks into fresh (aligned) buffers while the plain run keeps diffusers' tensors at
    the checkpoint's 8-byte offsets; the CPU kernels may round those differently in the last bit
    (docs/calibration.md), which can move a per-step min / max by an ulp and a value across a histogram bin."""
    import torch
    from safetensors.torch import load_file

    ra, rb = load_file(str(a)), load_file(str(b))
    if set(ra) != set(rb):
        return "different tensor names"
    bad = [k for k in ra if not torch.equal(ra[k], rb[k])]
    if not bad:
        return "byte-identical"
    rel = max(
        float(((ra[k].double() - rb[k].double()).abs() / ra[k].double().abs().clamp_min(1e-30)).max())
        for k in bad
        if not k.endswith("::hist")
    ) if any(not k.endswith("::hist") for k in bad) else 0.0  # fmt: skip
    moved = sum(int((ra[k] - rb[k]).abs().sum()) for k in bad if k.endswith("::hist"))
    total = sum(int(ra[k].sum()) for k in ra if k.endswith("::hist"))
    return (f"{len(bad)} of {len(ra)} tensors differ (min/max: max relative difference {rel:.1e}; histograms: "
            f"{moved} of {total} counts in a neighbouring bin)")  # fmt: skip


def make_fixture(folder: Path, channels: tuple[int, ...], seed: int = 0) -> Path:
    """tiny-sd's pipeline with a wider UNet (random weights, float32 safetensors) at ``folder``."""
    import torch
    from diffusers import UNet2DConditionModel

    from qdiff.export.resolve import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd")
    n = len(channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=pipe.unet.config.cross_attention_dim, attention_head_dim=8,
    )  # fmt: skip
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    pipe.register_modules(unet=unet)
    pipe.save_pretrained(folder)
    return folder


def make_recipe(path: Path, base: str) -> Path:
    from qdiff.config.recipe import Recipe

    r = Recipe.load(base)
    r = r.replace(
        name=f"bench-{base}",
        sampler=dataclasses.replace(r.sampler, steps=1, height=64, width=64),
        calibration=dataclasses.replace(r.calibration, num_prompts=1, batch_size=1),
        sensitivity=dataclasses.replace(r.sensitivity, mode="fast", proxy="local", fast_prompts=1),
    )
    r.save(path)
    return path


def run(cmd: list[str], floor: int = 3 * GIB) -> dict:
    """One child process: wall time, exit code and peak RSS (``ru_maxrss``, :func:`bench_memory.watch`)."""
    from bench_memory import watch  # this folder is on sys.path when a script here runs

    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    code, peak_rss, killed = watch(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL), floor, poll=0.2)
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss": peak_rss, "returncode": code,
            "killed": killed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a diffusers pipeline folder (default: build the fixture in --scratch)")
    p.add_argument("--channels", default="128,256,512,512", help="fixture UNet block widths")
    p.add_argument("--recipe", default="mixdq-w4a8", help="base recipe (made fast: 1 step, 1 prompt, local proxy)")
    p.add_argument("--scratch", default="/work/scratch")
    p.add_argument("--keep", action="store_true", help="keep the fixture and the calibration folders")
    p.add_argument("--results", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    scratch = Path(args.scratch) / "bench-offload-calib"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        model = (
            Path(args.model)
            if args.model
            else make_fixture(scratch / "model", tuple(map(int, args.channels.split(","))))
        )
        unet_bytes = sum(f.stat().st_size for f in (model / "unet").glob("*.safetensors"))
        recipe = make_recipe(scratch / "recipe.yaml", args.recipe)
        rows = {}
        for mode in ("none", "sequential"):
            out = scratch / f"calib-{mode}"
            cmd = [sys.executable, "-c", CLI, "calibrate", "--model", str(model), "--recipe", str(recipe),
                   "--out", str(out), "--offload", mode, "--no-progress"]  # fmt: skip
            rows[mode] = run(cmd)
        plans = [json.loads((scratch / f"calib-{m}" / "plan.json").read_text())["layers"] for m in rows]
        same = plans[0] == plans[1]  # the ranges may differ in the last bit (compare_ranges)
        ranges = compare_ranges(*(scratch / f"calib-{m}" / "ranges.safetensors" for m in rows))
        print(f"\ndenoiser on disk: {unet_bytes / GIB:.2f} GiB; plans identical: {same}; ranges: {ranges}")
        print("| --offload | peak RSS | wall |\n|---|---|---|")
        for mode, r in rows.items():
            note = " (killed: low memory)" if r["killed"] else ("" if r["returncode"] == 0 else " (failed)")
            print(f"| {mode} | {r['peak_rss'] / GIB:.2f} GiB | {r['wall_s']:.1f} s{note} |")
        if args.results:
            saved = {"unet_bytes": unet_bytes, "same_plan": same, "ranges": ranges, "rows": rows}
            args.results.write_text(json.dumps(saved, indent=2))
        return 0 if same and all(r["returncode"] == 0 for r in rows.values()) else 1
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
