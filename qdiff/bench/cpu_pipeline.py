"""Whole-pipeline CPU timings on the bundled Shapes model: float vs W8A8 / W4A8 on ``cpu_int8``, s per image.

Every variant is resident at once (the model is small) and timed in interleaved rounds of one batch each through
:func:`qdiff.sampling.draw.draw` with the recipe's sampler (4 steps, 64 px, guidance 3). Quantized variants are
quantized as ``qdiff.quantize`` does for these dynamic-activation recipes (sampler, layer specs, freeze, kernel),
once per recipe, in float32, and then placed with float32 or bfloat16 float parts. Pictures are checked, not
assumed: each int8 variant's images must be ``torch.equal`` to its own twin on the torch reference backend, and
every variant states its SSIM against the float32 images of the same seeds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qdiff.bench.cpu import INT8, REF, Target, best_of_rounds, ran_on, spied
from qdiff.bench.report import markdown_table
from qdiff.calib.metrics import ssim
from qdiff.config.recipe import Recipe
from qdiff.export.resolve import load_pipeline, place
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.models.schedulers import apply_sampler_scheduler
from qdiff.quant.transform import apply_specs, layer_specs, quantized_layers
from qdiff.sampling.draw import draw, prompt_seeds
from qdiff.sampling.prompts import load_prompts

MODEL = "builtin:shapes"
RECIPES = {"W8A8": "shapes-w8a8", "W4A8": "shapes-w4a8"}
BATCH, QUICK_BATCH = 16, 2
# (label, recipe key or None, float parts dtype, kernel preference of the quantized layers)
VARIANTS: tuple[tuple[str, str | None, torch.dtype, str | None], ...] = (
    ("fp32", None, torch.float32, None),
    ("bf16", None, torch.bfloat16, None),
    ("W8A8", "W8A8", torch.float32, INT8),
    ("W8A8", "W8A8", torch.bfloat16, INT8),
    ("W4A8", "W4A8", torch.float32, INT8),
    ("W4A8", "W4A8", torch.bfloat16, INT8),
    ("W8A8", "W8A8", torch.float32, REF),
)


@dataclass(frozen=True)
class PipeRow:
    variant: str
    parts: str  # float parts dtype
    backend: str  # what the spy saw over one batch
    seconds: float  # best batch time
    ssim_mean: float
    ssim_min: float
    twin: str  # "= reference twin" / "DIFFERS from reference twin" / ""


def quantize_denoiser(pipe, recipe: Recipe, kernel: str) -> int:
    """Quantize ``pipe``'s denoiser in place as ``qdiff.quantize`` does for a dynamic-activation recipe; returns
    the number of quantized layers. (Static recipes need a calibration run: not benchmarked here.)"""
    if recipe.activations.mode != "dynamic":
        raise ValueError(f"recipe {recipe.name!r}: only dynamic activations are benchmarked without calibration")
    den = find_denoiser(pipe)[1]
    layers = apply_specs(den, layer_specs(get_adapter(den).layers(den), recipe))
    for m in layers.values():
        m.freeze()
        m.kernel = kernel
    return len(layers)


def set_kernel(pipe, kernel: str) -> None:
    for m in quantized_layers(find_denoiser(pipe)[1]).values():
        m.kernel = kernel


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]


def _build(use_int8: bool) -> tuple[dict[str, object], dict[str, tuple[str, str, str | None]], Recipe]:
    """name -> pipeline, name -> (label, parts, kernel); the sampler recipe (every variant draws with it)."""
    recipes = {key: Recipe.load(name) for key, name in RECIPES.items()}
    sampler_recipe = recipes["W8A8"]
    base = load_pipeline(MODEL)  # float32 as built
    base.set_progress_bar_config(disable=True)
    apply_sampler_scheduler(base, sampler_recipe.sampler)
    quantized: dict[tuple[str, str], object] = {}
    pipes, info = {}, {}
    for label, key, dt, kernel in VARIANTS:
        if kernel == INT8 and not use_int8:
            continue
        if key is None:
            pipe = copy.deepcopy(base)
        else:
            if key not in quantized:  # one quantization per recipe (W4A8's MSE range search is the slow part)
                q = copy.deepcopy(base)
                apply_sampler_scheduler(q, recipes[key].sampler)
                quantize_denoiser(q, recipes[key], INT8)
                quantized[key] = q
            pipe = copy.deepcopy(quantized[key])
            set_kernel(pipe, kernel)
        place(pipe, "cpu", dt)
        name = f"{label} ({kernel}), {_dtype_name(dt)} float parts" if kernel else f"float {label}"
        pipes[name] = pipe
        info[name] = (label if kernel is None else f"{label} ({kernel})", _dtype_name(dt), kernel)
    return pipes, info, sampler_recipe


def shapes_section(rounds: int, quick: bool, use_int8: bool) -> tuple[str, list[Target]]:
    """Markdown section and the Shapes targets (W8A8 <= 0.9x, W4A8 <= 1.0x the best float time per image)."""
    pipes, info, recipe = _build(use_int8)
    batch = QUICK_BATCH if quick else BATCH
    prompts = load_prompts(recipe.calibration.prompts, batch)
    seeds = prompt_seeds(recipe.sampler, batch)

    def drawer(pipe) -> Callable[[], Tensor]:
        return lambda: draw(pipe, prompts, seeds, recipe.sampler, batch)

    images: dict[str, Tensor] = {}
    backends: dict[str, str] = {}
    twins: dict[str, str] = {}
    with torch.inference_mode():
        for name, pipe in pipes.items():
            images[name], counts = spied(drawer(pipe))  # warm-up batch, spied
            backends[name] = ran_on(counts)
            if info[name][2] == INT8:  # the same pipeline with every quantized layer on the reference backend
                set_kernel(pipe, REF)
                twin = drawer(pipe)()
                set_kernel(pipe, INT8)
                twins[name] = "= reference twin" if torch.equal(images[name], twin) else "**DIFFERS** from reference"
        best, r = best_of_rounds({name: drawer(p) for name, p in pipes.items()}, rounds)
    ref = images["float fp32"]
    rows = []
    for name in pipes:
        s = ssim(images[name], ref)
        label, parts, _ = info[name]
        rows.append(PipeRow(label, parts, backends[name], best[name] / batch, float(s.mean()), float(s.min()),
                            twins.get(name, "")))  # fmt: skip
    return _render(rows, batch, r, recipe), _targets(rows)


def _render(rows: list[PipeRow], batch: int, r: int, recipe: Recipe) -> str:
    best_float = min(row.seconds for row in rows if row.backend == "float")
    table = [
        [row.variant, row.parts, row.backend, f"{row.seconds * batch:.3f}", f"{row.seconds * 1e3:.1f}",
         f"{row.seconds / best_float:.2f}x", f"{row.ssim_mean:.4f} / {row.ssim_min:.4f}", row.twin]
        for row in rows
    ]  # fmt: skip
    cols = ["variant", "float parts", "quantized layers ran on (spy, one batch)", "s / batch", "ms / image",
            "vs best float", "SSIM vs fp32 (mean / min)", "images"]  # fmt: skip
    s = recipe.sampler
    intro = (
        "### Shapes pipeline\n\n"
        f"`{MODEL}`, the recipe's sampler ({s.steps} steps, {s.height}x{s.width} px, guidance {s.guidance_scale:g}), "
        f"{batch} prompts of the `{recipe.calibration.prompts}` set in one batch (text encoder, denoiser, VAE), seeds "
        f"{s.seed}..{s.seed + batch - 1}; best of {r} interleaved rounds. W8A8 = `{RECIPES['W8A8']}`, W4A8 = "
        f"`{RECIPES['W4A8']}` (its own MSE ranges), quantized in float32; the float parts (text encoder, norms, "
        'attention matmuls, VAE, unquantized layers) then run in the stated dtype. "best float" = the faster of '
        "fp32 and bf16. `= reference twin`: the images are `torch.equal` to the same pipeline with every quantized "
        "layer on the torch reference backend. SSIM against the fp32 float images (same prompts and seeds)."
    )
    return intro + "\n\n" + markdown_table(cols, table)


def _targets(rows: list[PipeRow]) -> list[Target]:
    best_float = min(row.seconds for row in rows if row.backend == "float")
    out = []
    for label, bound in (("W8A8", 0.9), ("W4A8", 1.0)):
        mine = [r for r in rows if r.variant == f"{label} ({INT8})"]
        best = min(mine, key=lambda r: r.seconds) if mine else None
        what = f"Shapes {label} per image vs best float" + (f" ({best.parts} float parts)" if best else "")
        out.append(Target(what, best.seconds / best_float if best else None, bound))
    return out
