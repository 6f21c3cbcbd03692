"""Q-Sched per prompt family (issue 25): the default and an ablation of the JAQ terms, on held-out prompt families.

    qdiff quantize --recipe shapes-w4a8 --out out/q25/w4a8 --no-progress
    OMP_NUM_THREADS=1 python scripts/qsched_families.py out/q25/w4a8 --out out/q25/families

Two prompt families are held out of fitting *and* validation (``--hold-out``, default ``background=gray`` and
``template=t2``, the template that names no background): the fits draw from the Shapes prompt pool without them.
Each variant (the bundled recipe's ``qsched`` section with one change, fitted on the export) is evaluated — kept
by its validation test or not — on

* ``heldout256``: the project's 256 held-out captions (``shapes-heldout``), seeds 1000..1255;
* ``bg-gray``: 64 captions naming a gray background (training combinations and templates), 2 seeds each (3000..);
* ``t2``: 64 captions of template t2, 2 seeds each (4000..);

(no fit ever uses these seeds: fitting 0.., validation 10000.., reference 20000..). Per image: Shapes CLIP score,
quality, attribute correctness and classifier features; per variant and set: Shapes-FID against renders of the
same captions and its paired bootstrap interval against the plain scheduler (same prompts, seeds and renders).
Per-image arrays go to ``OUT/<export>/<variant>/<set>.npz`` and fits to ``OUT/<export>/fits.json`` as they finish,
so a rerun resumes; ``OUT/results.json`` and ``OUT/table.md`` are the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

ABLATION = {"shrinkage": ()}  # one fit, no cross-validation: what each objective does on its own
VARIANTS: dict[str, dict[str, Any] | None] = {  # None: no fit (the plain scheduler; "_steps": at other steps)
    "plain": None,
    "default": {},
    "default + anchor (w=1)": {"anchor_weight": 1.0},  # the default's cross-validated shrinkage, with the anchor
    "default, finer shrinkage": {"shrinkage": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 32.0)},
    "alignment (k=0)": {**ABLATION},
    "quality only": {**ABLATION, "alignment_weight": 0.0, "k": 0.05},
    "anchor only (8-step, w=1)": {**ABLATION, "alignment_weight": 0.0, "anchor_weight": 1.0},
    "joint (k=0.05)": {**ABLATION, "k": 0.05},
    "alignment + anchor (w=1)": {**ABLATION, "anchor_weight": 1.0},
    "plain, 8 steps (the anchor)": {"_steps": 8},
}
SETS = ("heldout256", "bg-gray", "t2")
FAMILY_PROMPTS = 64  # captions per held-out family (x 2 seeds)


def eval_set(name: str, held: list[str]) -> tuple[list[str], list[int], list[int], list[int]]:
    """(captions per image, seeds, prompt ids, seed slots) of an evaluation set."""
    from qdiff.models.shapes import data
    from qdiff.sampling.prompts import load_prompts

    if name == "heldout256":
        caps = load_prompts("shapes-heldout", 256)
        return caps, [1000 + i for i in range(256)], list(range(256)), [0] * 256
    rng, caps = np.random.default_rng({"bg-gray": 7001, "t2": 7002}[name]), []
    tpl = data.TRAIN_TEMPLATES
    while len(caps) < FAMILY_PROMPTS:
        a = data.sample_attributes(rng, "train")
        if name == "bg-gray":
            if data.ATTRIBUTES["background"][a.background] != "gray":
                continue
            t = [x for i, x in enumerate(tpl) if "{background}" in x and f"template=t{i}" not in held]
        else:
            t = [tpl[2]]
        caps.append(data.caption(a, rng, tuple(t)))
    base = {"bg-gray": 3000, "t2": 4000}[name]
    n = len(caps)
    return caps * 2, [base + i for i in range(2 * n)], list(range(n)) * 2, [0] * n + [1] * n


@functools.cache
def _scorers():
    """(attribute classifier, CLIP scorer, quality scorer) of Shapes, loaded once."""
    from qdiff.models.shapes.scorers import AttributeClassifier, ClipScorer, QualityScorer

    return AttributeClassifier(), ClipScorer(), QualityScorer()


def judge(images, caps: list[str]) -> dict[str, np.ndarray]:
    from qdiff.models.shapes.data import ATTRIBUTE_KEYS, parse_caption

    cls, clip, quality = _scorers()
    pred = cls.predict(images).numpy()
    correct = np.full(pred.shape, np.nan)
    for i, c in enumerate(caps):
        for k, v in parse_caption(c).items():
            correct[i, ATTRIBUTE_KEYS.index(k)] = float(pred[i, ATTRIBUTE_KEYS.index(k)] == v)
    return {"clip": clip.score(images, caps).numpy(), "quality": quality.score(images).numpy(),
            "features": cls.features(images).double().numpy(), "correct": correct}  # fmt: skip


def real_features(out: Path, name: str, caps: list[str]) -> np.ndarray:
    path = out / f"real-{name}.npy"
    if not path.is_file():
        from qdiff.eval.shapes import real_renders

        np.save(path, _scorers()[0].features(real_renders(caps, seed=0)).double().numpy())
    return np.load(path)


def fit_variant(pipe, recipe, change: dict, pool: list[str], log: Path) -> dict[str, Any]:
    from qdiff.sched.run import fit_pipeline

    cfg = dataclasses.replace(recipe.qsched, **change)
    t0 = time.perf_counter()
    res = fit_pipeline(pipe, recipe.replace(qsched=cfg), prompts=pool, log=log, progress=False)
    fam = res.report["families"]
    cand = res.report["candidates"][0]  # the final search's schedule, kept or not
    return {"accepted": res.accepted, "message": res.message, "c_eps": cand["c_eps"], "c_x": cand["c_x"],
            "shrinkage": fam["shrinkage"], "rows": fam["rows"], "cv": fam["cv"], "generations": res.generations,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def run_export(folder: Path, out: Path, args) -> None:
    from qdiff.config.recipe import Recipe
    from qdiff.export.load import load_export
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.transform import get_info
    from qdiff.sampling.draw import draw
    from qdiff.sampling.prompts import load_prompts
    from qdiff.sched.families import label_table
    from qdiff.sched.qsched import Schedule, apply_schedule

    pipe = load_export(folder)
    recipe = get_info(find_denoiser(pipe)[1]).recipe
    recipe = recipe.replace(qsched=Recipe.load(recipe.name).qsched)  # the bundled default, as it is now
    here = out / recipe.name
    here.mkdir(parents=True, exist_ok=True)
    fits_path = here / "fits.json"
    fits = json.loads(fits_path.read_text()) if fits_path.is_file() else {}
    pool = load_prompts(recipe.qsched.prompts)
    labels = label_table(pool, tuple(dict.fromkeys(h.split("=")[0] for h in args.hold_out)))  # the named attributes
    pool = [p for p, lab in zip(pool, labels) if not {f"{k}={v}" for k, v in lab.items()} & set(args.hold_out)]
    print(f"[{recipe.name}] pool {len(pool)} prompts without {', '.join(args.hold_out)}", flush=True)
    for name, change in VARIANTS.items():
        if args.only and name not in args.only and name != "plain":
            continue
        steps = (change or {}).get("_steps")
        if steps:  # the un-scheduled sampler at other steps: a reference row, nothing fitted
            change = None
        if change is not None and name not in fits:
            fits[name] = fit_variant(pipe, recipe, change, pool, here / "fit.jsonl")
            fits_path.write_text(json.dumps(fits, indent=1) + "\n")
            print(f"[{recipe.name}] {name}: {fits[name]['message']} ({fits[name]['seconds']:.0f} s)", flush=True)
        rows = [(name, None if change is None else fits[name], False)]
        if change is not None and not fits[name]["accepted"] and name == "default":
            rows.append((name + ": searched, not kept", fits[name], True))
        for label, fit, force in rows:
            sched = None
            if fit is not None and (fit["accepted"] or force or name != "default"):
                sched = Schedule(tuple(fit["c_eps"]), tuple(fit["c_x"]))
            for s in SETS:
                path = here / _slug(label) / f"{s}.npz"
                if path.is_file():
                    continue
                if fit is not None and sched is None:  # the plain scheduler kept: the plain images, bit for bit
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes((here / "plain" / f"{s}.npz").read_bytes())
                    continue
                caps, seeds, _, _ = eval_set(s, args.hold_out)
                t0 = time.perf_counter()
                apply_schedule(pipe, None if sched is None or sched.is_identity else sched)
                sampler = dataclasses.replace(recipe.sampler, steps=steps) if steps else recipe.sampler
                images = draw(pipe, caps, seeds, sampler, 32)
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, **judge(images, caps))
                print(f"[{recipe.name}] {label} / {s}: {len(caps)} images in {time.perf_counter() - t0:.0f} s",
                      flush=True)  # fmt: skip
    apply_schedule(pipe, None)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def summarise(out: Path, args) -> dict[str, Any]:
    import torch

    from qdiff.sched.bootstrap import batched_frechet, paired_fd_difference, paired_mean_difference
    from qdiff.utils.machine import cpu_name

    results: dict[str, Any] = {"_meta": {"machine": f"{cpu_name()}, {torch.get_num_threads()} thread(s)",
                                         "hold_out": args.hold_out, "bootstrap": 2000, "level": 0.95}}  # fmt: skip
    for here in sorted(p for p in out.iterdir() if (p / "fits.json").is_file()):
        fits = json.loads((here / "fits.json").read_text())
        per: dict[str, Any] = {}
        for s in SETS:
            caps, _, p_ids, s_ids = eval_set(s, args.hold_out)
            real = torch.from_numpy(real_features(out, s, caps))
            plain = np.load(here / "plain" / f"{s}.npz")
            for variant in sorted(d.name for d in here.iterdir() if (d / f"{s}.npz").is_file()):
                m = np.load(here / variant / f"{s}.npz")
                feats = torch.from_numpy(m["features"])
                fd = paired_fd_difference(feats, torch.from_numpy(plain["features"]), real, p_ids, s_ids, 2000)
                clip = paired_mean_difference(m["clip"], plain["clip"], p_ids, s_ids, 2000)
                acc = {k: float(np.nanmean(m["correct"][:, i])) for i, k in enumerate(("shape", "colour", "size",
                                                                                       "position"))}  # fmt: skip
                per.setdefault(variant, {})[s] = {
                    "images": len(caps), "clip": float(m["clip"].mean()), "quality": float(m["quality"].mean()),
                    "acc": acc, "fid": float(batched_frechet(feats[None], real[None])[0]),
                    "fid_diff": fd.to_dict(), "clip_diff": clip.to_dict(),
                }  # fmt: skip
        results[here.name] = {"fits": fits, "eval": per}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| export | variant | kept | set | CLIP | quality | shape | colour | size | Shapes-FID | ΔFID [95%] |",
             "|" + "---|" * 11]  # fmt: skip
    for export, r in results.items():
        if export.startswith("_"):
            continue
        names = {_slug(n): n for n in list(VARIANTS) + ["default: searched, not kept"]}
        for slug, sets in r["eval"].items():
            name = names.get(slug, slug)
            fit = r["fits"].get(name.split(":")[0])
            kept = "-" if fit is None else ("yes" if fit["accepted"] else "**no**")
            for s, m in sets.items():
                d, a = m["fid_diff"], m["acc"]
                lines.append(f"| {export} | {name} | {kept} | {s} | {m['clip']:.2f} | {m['quality']:.2f} | "
                             f"{a['shape']:.3f} | {a['colour']:.3f} | {a['size']:.3f} | {m['fid']:.1f} | "
                             f"{d['value']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qdiff.config.sections import QSCHED_FAMILIES
    from qdiff.sched.families import EMBEDDING

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exports", nargs="*", help="quantized Shapes export folders (qdiff quantize --recipe shapes-w*)")
    p.add_argument("--out", required=True, help="folder for the per-image arrays, fits.json, results.json, table.md")
    p.add_argument("--hold-out", action="append", help="family held out of fitting and validation (attr=value)")
    p.add_argument("--only", action="append", help="run only these variants (repeatable; plain always runs)")
    args = p.parse_args(argv)
    args.hold_out = args.hold_out or ["background=gray", "template=t2"]
    shapes = [a for a in QSCHED_FAMILIES if a != EMBEDDING]  # held-out families are Shapes attribute values
    for h in args.hold_out:
        if h.count("=") != 1 or h.split("=")[0] not in shapes or not h.split("=")[1]:
            p.error(f"--hold-out {h!r}: expected attr=value with attr one of {', '.join(shapes)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for folder in args.exports:
        run_export(Path(folder), out, args)
    results = summarise(out, args)
    (out / "table.md").write_text(table(results))
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
