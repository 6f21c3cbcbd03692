"""The bundled Shapes LoRAs on quantized Shapes models vs the float model with the same LoRAs (docs/lora.md).

    python scripts/lora_shapes.py --num-prompts 256 --out docs/results/lora-shapes.md

Same held-out prompts (``shapes-heldout``) and seeds for every variant; the Shapes sampler (4 DDIM steps, guidance 3).
Variants: the float pipeline, ``shapes-w8a8`` and ``shapes-w4a8``, each with no LoRA, ``white-background``, ``large``
and both mixed with ``set_adapters([...], [0.6, 0.8])`` (runtime LoRAs beside the frozen layers), plus the LoRA fused
into the float weights before quantizing (``qdiff.quantize(..., loras=[...])``). Columns: SSIM against the float
pipeline with the same LoRAs; the LoRAs' effect as the Shapes classifier judges it: the share of prompts asking for
a black or gray background drawn on white, and of prompts asking for a small shape drawn large. The last lines check
the issue's targets and that ``unload_lora_weights`` gives the W8A8 images before loading back bit for bit.
Prints a markdown table; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

LORAS = ("white-background", "large")
MIX = (0.6, 0.8)


def main(argv: list[str] | None = None) -> int:
    import qdiff
    from qdiff.bench.report import write_atomic
    from qdiff.calib.metrics import ssim
    from qdiff.config.recipe import Recipe
    from qdiff.export.resolve import load_pipeline
    from qdiff.models.shapes import data
    from qdiff.models.shapes.pipeline import WEIGHTS_DIR
    from qdiff.models.shapes.scorers import AttributeClassifier
    from qdiff.sampling.draw import draw
    from qdiff.sampling.prompts import load_prompts

    p = argparse.ArgumentParser(description="Shapes LoRAs: quantized vs float")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    folder = WEIGHTS_DIR / "loras"
    prompts = load_prompts("shapes-heldout", args.num_prompts)
    sampler = Recipe.load("shapes-w8a8").sampler
    parsed = [data.parse_caption(text) for text in prompts]
    white, large = data.BACKGROUNDS.index("white"), data.SIZES.index("large")
    ask_bg = torch.tensor([c.get("background", white) != white for c in parsed])  # asks for black / gray
    ask_small = torch.tensor([c.get("size", large) != large for c in parsed])
    ask_white = torch.tensor([c.get("background") == white for c in parsed])
    clf = AttributeClassifier()

    def images(pipe) -> torch.Tensor:
        return draw(pipe, prompts, None, sampler, args.batch_size)

    def rates(img: torch.Tensor) -> tuple[float, float]:
        pred = clf.predict(img)
        return float((pred[ask_bg, 4] == white).float().mean()), float((pred[ask_small, 2] == large).float().mean())

    def load(pipe, names) -> None:
        for name in names:
            pipe.load_lora_weights(str(folder), weight_name=f"{name}.safetensors", adapter_name=name)

    configs = {"none": ([], []), "white-background": (["white-background"], [1.0]), "large": (["large"], [1.0]),
               f"both ({MIX[0]}, {MIX[1]})": (list(LORAS), list(MIX))}  # fmt: skip
    pipes = {"FP": load_pipeline("builtin:shapes")}
    for recipe in ("shapes-w8a8", "shapes-w4a8"):
        pipes[recipe] = qdiff.quantize(load_pipeline("builtin:shapes"), recipe, progress=False)
    results: dict[tuple[str, str], torch.Tensor] = {}
    before = images(pipes["shapes-w8a8"])
    for pipe in pipes.values():
        load(pipe, LORAS)
    for config, (names, weights) in configs.items():
        for variant, pipe in pipes.items():
            if names:
                pipe.enable_lora()
                pipe.set_adapters(names, weights)
            else:
                pipe.disable_lora()
            results[(config, variant)] = images(pipe)
    pipes["shapes-w8a8"].unload_lora_weights()
    unload_identical = torch.equal(images(pipes["shapes-w8a8"]), before)
    for recipe in ("shapes-w8a8", "shapes-w4a8"):  # the LoRA fused into the float weights before quantizing
        fused = qdiff.quantize(load_pipeline("builtin:shapes"), recipe, progress=False,
                               loras=[f"{folder / 'white-background.safetensors'}:1.0"])  # fmt: skip
        results[("white-background", f"{recipe}, fused before quantizing")] = images(fused)

    lines = [f"{len(prompts)} shapes-heldout prompts ({int(ask_bg.sum())} ask for a black or gray background, "
             f"{int(ask_small.sum())} for a small shape), seeds {sampler.seed}+i, {sampler.steps} steps, guidance "
             f"{sampler.guidance_scale:g}; {time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads, "
             f"1-minute load average {os.getloadavg()[0]:.2f}", "",
             "| LoRA (set_adapters weights) | variant | SSIM vs FP + same LoRA | drawn on white | drawn large |",
             "|---|---|---|---|---|"]  # fmt: skip
    ssims: dict[tuple[str, str], float] = {}
    effects = {key: rates(img) for key, img in results.items()}  # the classifier once per image set
    for (config, variant), img in results.items():
        ref = results[(config, "FP")]
        bg, big = effects[(config, variant)]
        ssims[(config, variant)] = s = float(ssim(img, ref).mean())
        shown = "-" if variant == "FP" else f"{s:.4f}"
        lines.append(f"| {config} | {variant} | {shown} | {100 * bg:.1f}% | {100 * big:.1f}% |")
    lines.append("")
    for config in configs:
        if config == "none":
            continue
        w8 = ssims[(config, "shapes-w8a8")]
        w4, w4_base = ssims[(config, "shapes-w4a8")], ssims[("none", "shapes-w4a8")]
        gaps = [100 * abs(a - b) for variant in ("shapes-w8a8", "shapes-w4a8")
                for a, b in zip(effects[(config, variant)], effects[(config, "FP")])]  # fmt: skip
        lines.append(f"- {config}: W8A8 SSIM {w8:.4f} (target >= 0.98: {'met' if w8 >= 0.98 else 'MISSED'}); W4A8 "
                     f"{w4:.4f} vs {w4_base:.4f} without LoRA (target within 0.01: "
                     f"{'met' if abs(w4 - w4_base) <= 0.01 else 'MISSED'}); largest effect-rate gap to FP "
                     f"{max(gaps):.1f} points (target <= 2: {'met' if max(gaps) <= 2 else 'MISSED'})")  # fmt: skip
    for variant in ("shapes-w8a8", "shapes-w4a8"):  # the content a background LoRA draws, without any LoRA
        img, ref = results[("none", variant)][ask_white], results[("none", "FP")][ask_white]
        lines.append(f"- {variant} without LoRA on the {int(ask_white.sum())} prompts that ask for a white "
                     f"background: SSIM {float(ssim(img, ref).mean()):.4f}")  # fmt: skip
    lines.append(f"- W8A8 after unload_lora_weights: {'bit-identical' if unload_identical else 'DIFFERENT'} to the "
                 "images before load_lora_weights")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_atomic(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
