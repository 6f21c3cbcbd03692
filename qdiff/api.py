"""The public verbs. Orchestration only: the math lives in ``qdiff.quant``, the I/O in ``qdiff.export``."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from qdiff.calib.capture import observing, run_sampler
from qdiff.calib.plan import Plan
from qdiff.calib.prompts import load_prompts
from qdiff.errors import QdiffError
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.quant.observers import make_observer
from qdiff.quant.transform import QuantInfo, apply_specs, get_info, layer_specs, quantized_layers, set_info
from qdiff.recipe import Recipe


def as_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    """A Recipe from a Recipe, a bundled name or a YAML path (``None`` → bundled ``w8a8``)."""
    if recipe is None:
        return Recipe.load("w8a8")
    if isinstance(recipe, Recipe):
        return recipe
    return Recipe.load(recipe)


def quantize(
    pipe,
    recipe: Recipe | Plan | str | Path | None = None,
    *,
    plan: Plan | str | Path | None = None,
    prompts: list[str] | None = None,
    progress: bool = True,
):
    """Quantize ``pipe``'s denoiser in place and return the same pipeline object.

    ``recipe`` is a :class:`Recipe`, a bundled recipe name (``"w8a8"``, ``"w4a8"``) or a YAML path;
    passing a :class:`Plan` instead (or ``plan=``) sets per-layer bits, the recipe supplying the rest.
    Static activation ranges (``activations.mode: static``) are calibrated by running the recipe's
    sampler over ``prompts`` (default: the recipe's calibration prompt set).
    """
    if isinstance(recipe, Plan):
        recipe, plan = None, recipe
    recipe = as_recipe(recipe)
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    attr, den = find_denoiser(pipe)
    if get_info(den) is not None or quantized_layers(den):
        raise QdiffError("pipeline is already quantized; load the float model again to quantize it differently")
    adapter = get_adapter(den)
    specs = layer_specs(adapter.layers(den), recipe, plan)
    if not specs:
        raise QdiffError("nothing to quantize: the recipe/plan selects no layer of this model")
    layers = apply_specs(den, specs)
    static = {name: m for name, m in layers.items() if m.qcfg.static_act}
    if static:
        _calibrate_static(pipe, static, recipe, prompts, progress)
    for m in tqdm(layers.values(), desc="packing weights", disable=not progress, leave=False):
        m.kernel = recipe.kernel
        m.freeze()
    base = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    set_info(den, QuantInfo(recipe=recipe, plan=plan, base_model=base or None))
    return pipe


def _calibrate_static(pipe, layers: dict, recipe: Recipe, prompts: list[str] | None, progress: bool) -> None:
    """Record per-tensor input ranges of ``layers`` over the sampler, then set their (scale, zero-point)."""
    cal, act = recipe.calibration, recipe.activations
    prompts = prompts or load_prompts(cal.prompts, cal.num_prompts)
    kwargs = {"momentum": act.momentum} if act.observer == "ema" else {}
    if act.observer == "percentile":
        kwargs = {"percentile": act.percentile}
    with observing(layers, lambda _: make_observer(act.observer, **kwargs)) as observers:
        run_sampler(pipe, prompts, recipe.sampler, cal.batch_size, progress, desc="calibrating activations")
    for name, layer in layers.items():
        obs = observers[name]
        if not obs.initialized:
            raise QdiffError(f"layer {name!r} saw no input during calibration; it cannot use static activations")
        layer.set_act_qparams(*obs.qparams(layer.qcfg.a_bits, symmetric=False))


def save(pipe, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Export a quantized pipeline to ``out_dir`` (atomic: written to a temp folder, then renamed)."""
    from qdiff.export.save import save_quantized

    return save_quantized(pipe, out_dir, overwrite=overwrite)


def load(path: str | Path, device: str | None = None):
    """Load an export folder into a ready pipeline (no network, no original checkpoint needed)."""
    from qdiff.export.load import load_export

    return load_export(path, device=device)
