"""Quantize on load: the float denoiser diffusers just loaded, quantized as :func:`qdiff.quantize` does.

Only what needs no forward pass of the float pipeline (the same rule as streaming, ``qdiff.export.stream``):
dynamic activations, float activations, or static ones with ranges from ``qdiff calibrate`` (``calib=DIR``).
BOS-aware recipes, Q-Sched and text-encoder sections need the whole pipeline, and a recipe's ``loras`` are fused
into the float pipeline before quantizing (never on load): run ``qdiff quantize`` and load the export instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qdiff.config.plan import Plan
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError


def _resolve(config) -> tuple[Recipe, Plan | None, object | None]:
    """(recipe, plan, captured ranges) named by a QdiffConfig; errors name the argument."""
    from qdiff.calib.stats import CapturedStats

    recipe = Recipe.load(config.recipe or "w8a8")
    if recipe.loras:  # before any other work; diffusers may skip check_recipe (no torch_dtype), never this
        paths = ", ".join(str(lora.path) for lora in recipe.loras)
        raise QdiffError(
            f"QdiffConfig(recipe={config.recipe!r}): the recipe fuses LoRAs (loras: {paths}); quantize-on-load does "
            f"not fuse them: run `qdiff quantize --recipe {config.recipe}` (--lora PATH:SCALE names the file) or "
            "qdiff.quantize(pipe, recipe) and load the export with DiffusionPipeline.from_pretrained"
        )
    plan = None if config.plan is None else Plan.load(config.plan)
    ranges = None
    if config.calib is not None:
        if not Path(config.calib).is_dir():
            raise QdiffError(f"QdiffConfig(calib={config.calib!r}): not a folder written by qdiff calibrate")
        ranges = CapturedStats.load(config.calib)
    return recipe, plan, ranges


def check_recipe(config) -> None:
    """Refuse, before any float weight is read, a recipe that needs a forward pass of the pipeline."""
    from qdiff.export.stream import can_stream

    recipe, plan, ranges = _resolve(config)
    ok, reason = can_stream(recipe, plan, ranges)
    if ok:
        return
    if "static activations" in reason:
        raise QdiffError(
            f"QdiffConfig(recipe={config.recipe!r}): {reason}; run `qdiff calibrate --model MODEL "
            f"--recipe {config.recipe} --out DIR` first and pass QdiffConfig(calib='DIR')"
        )
    raise QdiffError(
        f"QdiffConfig(recipe={config.recipe!r}) cannot quantize on load: {reason}; run `qdiff quantize` and load "
        "the export with DiffusionPipeline.from_pretrained"
    )


def quantize_denoiser(den: torch.nn.Module, config) -> torch.nn.Module:
    """Quantize ``den`` in place (the steps of :func:`qdiff.quantize` that touch the denoiser); returns it."""
    from qdiff.export.pretrained import attach_save
    from qdiff.models.adapters import get_adapter
    from qdiff.quant.ranges import static_qparams
    from qdiff.quant.transform import QuantInfo, apply_specs, layer_specs, set_info
    from qdiff.utils.finite import check_parameters

    recipe, plan, ranges = _resolve(config)
    check_parameters(den)
    specs = layer_specs(get_adapter(den).layers(den), recipe, plan)
    if not specs:
        raise QdiffError(f"QdiffConfig(recipe={config.recipe!r}): the recipe/plan selects no layer of this model")
    layers = apply_specs(den, specs, None)
    static = {name: m for name, m in layers.items() if m.qcfg.static_act}
    if static:  # check_recipe made sure ranges exist
        for name, qparams in static_qparams(static, recipe, ranges).items():
            static[name].set_act_qparams(*qparams)
    for m in layers.values():
        m.kernel = recipe.kernel
        m.freeze()
    base = den.config.get("_name_or_path") if hasattr(den, "config") else None
    set_info(den, QuantInfo(recipe=recipe, plan=plan, base_model=base or None))
    attach_save(den)  # pipe.save_pretrained writes a qdiff export
    return den.eval()
