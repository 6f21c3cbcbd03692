"""Compare Q-Sched optimisers on one quantized pipeline: JAQ-vs-generations curves and held-out JAQ.

    python -m qdiff.eval.qsched_compare --model builtin:tiny-sd --recipe w8a8 --out out/qsched-compare \\
        --alignment pyiqa:entropy --quality pyiqa:piqe --set grid:ramp --set cmaes:per_step

Each ``--set OPTIMISER:PARAMETERISATION`` runs :func:`qdiff.fit_schedule` with the recipe's ``qsched``
section changed accordingly (``--budget`` applies to the non-grid runs). All runs share one evaluation
log, so a rerun replays instead of drawing again; generations are still counted per run. Writes
``curves.png`` (best fitting JAQ vs generations) and ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from qdiff.errors import QdiffError


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m qdiff.eval.qsched_compare", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="export folder, or any model spec (quantized with --recipe)")
    p.add_argument("--recipe", default="w8a8", help="quantization recipe (also supplies sampler: and qsched:)")
    p.add_argument("--prompts", help="prompt set or .txt file (default: the recipe's)")
    p.add_argument("--alignment", help="alignment scorer spec (default: the recipe's)")
    p.add_argument("--quality", help="quality scorer spec (default: the recipe's)")
    p.add_argument("--set", action="append", dest="sets", help="OPTIMISER:PARAMETERISATION (repeatable)")
    p.add_argument("--budget", type=int, help="generations for the non-grid runs (default: 20%% of the grid)")
    p.add_argument("--out", required=True, help="folder for curves.png, results.json and the evaluation log")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except QdiffError as exc:
        print(f"qdiff: error: {exc}")
        return 1


def _run(args) -> int:
    import qdiff
    from qdiff.export.resolve import load_pipeline
    from qdiff.quant.transform import get_info
    from qdiff.sched.plot import plot_curves
    from qdiff.sched.qsched import apply_schedule

    recipe = qdiff.Recipe.load(args.recipe)
    pipe = load_pipeline(args.model)
    from qdiff.models.adapters import find_denoiser

    if get_info(find_denoiser(pipe)[1]) is None:
        qdiff.quantize(pipe, recipe, progress=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, curves = {}, {}
    for spec in args.sets or ["grid:ramp", "cmaes:per_step", "coordinate:per_step"]:
        optimiser, _, param = spec.partition(":")
        cfg = dataclasses.replace(
            recipe.qsched, optimiser=optimiser, parameterisation=param or "ramp",
            budget=None if optimiser == "grid" else args.budget,
        )  # fmt: skip
        apply_schedule(pipe, None)
        t0 = time.perf_counter()
        res = qdiff.fit_schedule(pipe, recipe.replace(qsched=cfg), prompts=args.prompts, alignment=args.alignment,
                                 quality=args.quality, log=out / "evaluations.jsonl", progress=False)  # fmt: skip
        results[spec] = {**res.to_dict(), "seconds": time.perf_counter() - t0}
        curves[f"{spec} (held-out {res.heldout_jaq_best:.4f})"] = res.curve
        print(f"{spec:24s} generations {res.generations:5d}  fit JAQ {res.train_jaq_identity:.4f} -> "
              f"{res.train_jaq_best:.4f}  held-out {res.heldout_jaq_identity:.4f} -> {res.heldout_jaq_best:.4f}  "
              f"accepted={res.accepted}")  # fmt: skip
    apply_schedule(pipe, None)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curves(curves, out / "curves.png")
    print(f"wrote {out / 'curves.png'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
