"""Skip-concatenation split (activations.split_skip) on vs off: final images vs FP, static activations.

    python scripts/measure_split.py [tiny-sd] [tiny-sdxl] [shapes]

tiny-sd / tiny-sdxl: w8a8-static (A8, model seeds 0-2) and A4 (seed 0), 16 coco prompts after the 8 used for
calibration. shapes: the bundled model, w8a8-static numerics with the Shapes sampler/calibration, 64 held-out
prompts, A8 and A4, EMA and min-max observers, plus how many images the split improves. Prints one line per run.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

import qdiff
from qdiff.calib.capture import generate
from qdiff.calib.metrics import sqnr_db, ssim
from qdiff.config.recipe import Recipe
from qdiff.sampling.prompts import load_prompts


def compare(build, recipe: Recipe, prompts: list[str], batch: int) -> str:
    fp = generate(build(), prompts, recipe.sampler, batch)
    res = {}
    for split in (True, False):
        r = recipe.replace(activations=dataclasses.replace(recipe.activations, split_skip=split))
        img = generate(qdiff.quantize(build(), r, progress=False), prompts, r.sampler, batch)
        per_image = torch.tensor([sqnr_db(fp[i], img[i]) for i in range(len(prompts))])
        res[split] = (float(ssim(fp, img).mean()), sqnr_db(fp, img), per_image)
    wins = int((res[True][2] > res[False][2]).sum())
    return (f"split on: SSIM {res[True][0]:.5f} SQNR {res[True][1]:.2f} dB | off: SSIM {res[False][0]:.5f} "
            f"SQNR {res[False][1]:.2f} dB | split better on {wins}/{len(prompts)} images")  # fmt: skip


def with_act(recipe: Recipe, **changes) -> Recipe:
    return recipe.replace(activations=dataclasses.replace(recipe.activations, **changes))


def main(models: list[str]) -> None:
    from qdiff.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

    torch.set_num_threads(1)
    base = Recipe.load("w8a8-static")
    coco = load_prompts("coco", 24)[8:24]  # calibration uses the first 8
    tiny = {"tiny-sd": tiny_sd_pipeline, "tiny-sdxl": tiny_sdxl_pipeline}
    for model in models:
        if model in tiny:
            for bits, seeds in ((8, (0, 1, 2)), (4, (0,))):
                for seed in seeds:
                    line = compare(lambda m=model, s=seed: tiny[m](seed=s), with_act(base, bits=bits), coco, 8)
                    print(f"{model} A{bits} seed {seed}: {line}", flush=True)
        elif model == "shapes":
            from qdiff.models.shapes.pipeline import shapes_pipeline

            s = Recipe.load("shapes-w4a8-static")
            shapes = base.replace(sampler=s.sampler, calibration=s.calibration, bos_aware=s.bos_aware)
            held = load_prompts("shapes-heldout", 64)
            for bits in (8, 4):
                for obs in ("ema", "minmax"):
                    line = compare(shapes_pipeline, with_act(shapes, bits=bits, observer=obs), held, 16)
                    print(f"shapes A{bits} {obs}: {line}", flush=True)
        else:
            raise SystemExit(f"unknown model {model!r}: tiny-sd, tiny-sdxl or shapes")


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny-sd", "tiny-sdxl", "shapes"])
