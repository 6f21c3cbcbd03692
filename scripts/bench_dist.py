"""Speed-up of distributed calibration: ``qdiff calibrate --mode full`` as one process vs ``torchrun`` with 2 ranks.

Each round runs both configurations back to back (interleaved, alternating which goes first), one thread per rank
(``OMP_NUM_THREADS=1``), each into a fresh output folder; the table shows the median wall time over rounds and the
speed-up of 2 ranks over 1. Run it on an otherwise idle machine (the numbers of a busy one mean nothing)::

    python scripts/bench_dist.py --model builtin:tiny-sd --rounds 3

and paste the printed markdown table into docs/distributed.md. The recipe is mixdq-w4a8 in full mode with 2 sampler
steps, shrunk to ``--layers`` analysed layers (default: all of the tiny model's) so one round takes minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _recipe(folder: Path, prompts: int, sens_prompts: int, skip: tuple[str, ...]) -> Path:
    from qdiff.config.recipe import Recipe

    r = Recipe.load("mixdq-w4a8")
    r = r.replace(
        name="bench-dist",
        sampler=dataclasses.replace(r.sampler, steps=2),
        calibration=dataclasses.replace(r.calibration, num_prompts=prompts, batch_size=1),
        sensitivity=dataclasses.replace(r.sensitivity, mode="full", num_prompts=sens_prompts),
        skip=skip,
    )
    path = folder / "recipe.yaml"
    r.save(path)
    return path


def _run(ranks: int, model: str, recipe: Path, out: Path) -> float:
    qdiff = shutil.which("qdiff") or str(Path(sys.executable).with_name("qdiff"))
    args = ["calibrate", "--model", model, "--recipe", str(recipe), "--out", str(out), "--no-progress"]
    cmd = [qdiff, *args] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             f"--nproc-per-node={ranks}", "--no-python", qdiff, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{res.stderr[-3000:]}")
    return seconds


def main() -> int:
    from qdiff.utils.machine import cpu_name

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny-sd", help="model spec (default: builtin:tiny-sd)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--prompts", type=int, default=4, help="calibration prompts (default: 4)")
    p.add_argument("--sensitivity-prompts", type=int, default=2, help="prompts per sensitivity run (default: 2)")
    p.add_argument(
        "--skip",
        nargs="*",
        default=["down_blocks.*", "up_blocks.*"],
        help="layer patterns left out of the analysis (default: down/up blocks: a ~2-minute round)",
    )
    args = p.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        folder = Path(tmp)
        recipe = _recipe(folder, args.prompts, args.sensitivity_prompts, tuple(args.skip))
        for i in range(args.rounds):
            for ranks in (1, 2) if i % 2 == 0 else (2, 1):
                out = folder / f"r{i}-n{ranks}"
                times[ranks].append(_run(ranks, args.model, recipe, out))
                print(f"round {i + 1}: {ranks} rank(s) {times[ranks][-1]:.1f} s", file=sys.stderr)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(
        f"{args.model}, mixdq-w4a8 full mode (2 steps, {args.prompts} calibration / {args.sensitivity_prompts} "
        f"sensitivity prompts), {cpu_name()}, one thread per rank, median of {args.rounds} interleaved rounds\n"
    )
    print("| ranks | wall s (median) | speed-up |")
    print("|---|---|---|")
    for n in (1, 2):
        print(f"| {n} | {med[n]:.1f} | {med[1] / med[n]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
