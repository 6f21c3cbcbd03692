"""Measure the fast sensitivity mode against MixDQ's full mode (and BOS-aware on/off) on any model.

    python -m qdiff.calib.sensitivity_report --model builtin:shapes --recipe mixdq-w4a8 --out out/sens-report
    python -m qdiff.calib.sensitivity_report --model builtin:tiny-sd --recipe mixdq-w4a8 --steps 2 \
        --num-prompts 4 --out out/tiny-report --bos --plant-bos 50

Writes ``report.json`` (wall times, speed-up, Spearman rank correlations per candidate column and group),
both tables (``fast.json`` / ``full.json`` + CSV + PNG) and prints a summary. ``--bos`` also measures
BOS-aware cross-attention K/V on vs off under the recipe (``--plant-bos F`` first scales token 0 of the
text encoder's output by F, the test fixture for models without a BOS outlier).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from qdiff.calib.capture import capture_stats
from qdiff.calib.metrics import sqnr_db, ssim
from qdiff.calib.plot import save_png
from qdiff.calib.sensitivity import analyze, spearman
from qdiff.calib.table import SensitivityTable
from qdiff.config.recipe import Recipe
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.sampling.draw import draw
from qdiff.sampling.prompts import load_prompts


def compare(fast: SensitivityTable, full: SensitivityTable) -> dict:
    """Spearman of fast vs full scores per candidate column and group, plus their mean."""
    out: dict = {}
    for col in full.columns():
        kind, bits = col[0], col[1:]
        for group in ("content", "quality"):
            pairs = [
                (r[kind][bits], fast.row(r["name"])[kind][bits])
                for r in full.rows
                if r["group"] == group and bits in r[kind]
            ]
            if len(pairs) >= 3:
                out[f"{col}/{group}"] = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    values = [v for v in out.values() if v == v]
    return {"per_column": out, "mean": sum(values) / len(values) if values else None, "min": min(values, default=None)}


def bos_effect(spec: str, recipe: Recipe, prompts: list[str], plant: float | None) -> dict:
    """K/V output SQNR (worst and mean over layers) and image SSIM vs FP, BOS-aware off and on."""
    import qdiff
    from qdiff.calib.bos_probe import plant_bos_outlier
    from qdiff.export.resolve import load_pipeline

    res = {}
    for bos in (False, True):
        pipe = load_pipeline(spec)
        if plant:
            plant_bos_outlier(pipe.text_encoder, plant)
        _, den = find_denoiser(pipe)
        names = get_adapter(den).cross_attention_kv(den)
        runs = []
        for quantized in (False, True):
            if quantized:
                qdiff.quantize(pipe, recipe.replace(bos_aware=bos), progress=False)
            outs: dict = {}
            hooks = [
                den.get_submodule(n).register_forward_hook(
                    lambda _m, _a, o, n=n, d=outs: d.setdefault(n, []).append(o)
                )
                for n in names
            ]
            images = draw(pipe, prompts, None, recipe.sampler, recipe.calibration.batch_size)
            for h in hooks:
                h.remove()
            runs.append((images, {n: torch.cat(v) for n, v in outs.items()}))
        (fp_img, fp_kv), (q_img, q_kv) = runs
        s = [sqnr_db(fp_kv[n], q_kv[n]) for n in names]
        res["on" if bos else "off"] = {
            "kv_sqnr_min_db": min(s), "kv_sqnr_mean_db": sum(s) / len(s), "ssim": float(ssim(fp_img, q_img).mean())
        }  # fmt: skip
    return res


def main(argv: list[str] | None = None) -> int:
    from qdiff.export.resolve import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipe", default="mixdq-w4a8")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, help="override sampler.steps")
    ap.add_argument("--num-prompts", type=int, help="override sensitivity.num_prompts (full mode)")
    ap.add_argument("--fast-prompts", type=int, help="override sensitivity.fast_prompts")
    ap.add_argument("--proxy", choices=("local", "denoiser", "gain"), help="override sensitivity.proxy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bos", action="store_true", help="also measure BOS-aware on vs off")
    ap.add_argument("--plant-bos", type=float, default=None, help="scale token 0 of the text embedding by this")
    args = ap.parse_args(argv)
    recipe = Recipe.load(args.recipe)
    s = recipe.sensitivity
    s = dataclasses.replace(
        s, num_prompts=args.num_prompts or s.num_prompts, fast_prompts=args.fast_prompts or s.fast_prompts,
        proxy=args.proxy or s.proxy,
    )  # fmt: skip
    recipe = recipe.replace(sensitivity=s)
    if args.steps:
        recipe = recipe.replace(sampler=dataclasses.replace(recipe.sampler, steps=args.steps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model)
    pipe.to(args.device)
    stats = capture_stats(pipe, recipe)
    tables, times = {}, {}
    for mode in ("fast", "full"):
        r = recipe.replace(sensitivity=dataclasses.replace(recipe.sensitivity, mode=mode))
        t0 = time.perf_counter()
        tables[mode] = analyze(pipe, r, stats=stats)
        times[mode] = time.perf_counter() - t0
        tables[mode].save_json(out / f"{mode}.json")
        tables[mode].save_csv(out / f"{mode}.csv")
        save_png(tables[mode], out / f"{mode}.png", title=f"{args.model}: {mode} sensitivity")
    report = {
        "model": args.model, "recipe": recipe.to_dict(), "layers": len(tables["full"].rows),
        "wall_s": times, "speedup": times["full"] / times["fast"], "spearman": compare(tables["fast"], tables["full"]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(args.device)},
    }  # fmt: skip
    if args.bos:
        prompts = load_prompts(recipe.calibration.prompts, s.num_prompts)
        report["bos"] = bos_effect(args.model, recipe, prompts, args.plant_bos)
        report["bos"]["planted_factor"] = args.plant_bos
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    sp = report["spearman"]
    print(
        f"{args.model}: {report['layers']} layers, fast ({s.proxy}) {times['fast']:.1f} s vs full "
        f"{times['full']:.1f} s -> {report['speedup']:.1f}x; Spearman mean {sp['mean']:.3f}, min {sp['min']:.3f}"
    )
    for k, v in sp["per_column"].items():
        print(f"  spearman {k:<14} {v:.3f}")
    if args.bos:
        print(f"  BOS-aware: {json.dumps(report['bos'])}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
