"""The public verbs. Orchestration only: the math lives in ``qdiff.quant``, the I/O in ``qdiff.export``."""

from __future__ import annotations

from pathlib import Path

from qdiff.calib.capture import observing
from qdiff.calib.stats import CapturedStats
from qdiff.config.plan import Plan
from qdiff.config.recipe import Recipe, TextEncoderConfig
from qdiff.errors import QdiffError
from qdiff.export.pretrained import attach_save, attach_text_encoder_save
from qdiff.lora.fuse import fuse_recipe_loras, fused_loras, with_loras
from qdiff.lora.pipeline import attach_pipeline_hooks
from qdiff.lora.saved import saved_entry
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.models.schedulers import apply_sampler_scheduler
from qdiff.quant.observers import make_observer
from qdiff.quant.ranges import static_qparams
from qdiff.quant.split import SplitObserver
from qdiff.quant.transform import QuantInfo, apply_specs, get_info, layer_specs, quantized_layers, set_info
from qdiff.sampling.draw import draw
from qdiff.sampling.prompts import load_prompts
from qdiff.utils.finite import check_parameters
from qdiff.utils.lazy_imports import defer_bitsandbytes
from qdiff.utils.progress import progress_bar


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
    ranges: CapturedStats | None = None,
    loras=None,
):
    """Quantize ``pipe``'s denoiser in place and return the same pipeline object.

    ``recipe`` is a :class:`Recipe`, a bundled recipe name (``"w8a8"``, ``"w4a8"``) or a YAML path;
    passing a :class:`Plan` instead (or ``plan=``) sets per-layer bits, the recipe supplying the rest.
    Static activation ranges (``activations.mode: static``) are calibrated by running the recipe's
    sampler over ``prompts`` (default: the recipe's calibration prompt set), or taken from ``ranges``
    (statistics captured by :func:`calibrate`). ``recipe.bos_aware`` makes cross-attention K/V BOS-aware.
    ``loras`` (``["PATH[:SCALE]", ...]``, default: the recipe's ``loras``) are fused into the float weights first
    (:mod:`qdiff.lora.fuse`); the export records them with their sha256.
    """
    if isinstance(recipe, Plan):
        recipe, plan = None, recipe
    recipe = as_recipe(recipe)
    attr, den = find_denoiser(pipe)
    recipe = _checked_loras(recipe, den, loras)
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if get_info(den) is not None or quantized_layers(den):
        raise QdiffError("pipeline is already quantized; load the float model again to quantize it differently")
    prompts = _check_prompts(prompts)
    check_parameters(den)  # before anything is modified: a NaN weight would reach every image
    fuse_recipe_loras(pipe, recipe)  # once: a CLI run may have fused them already
    adapter = get_adapter(den)
    apply_sampler_scheduler(pipe, recipe.sampler)  # recipe's scheduler choice; saved with the export
    if recipe.text_encoders != TextEncoderConfig():  # optional; before calibration so the denoiser sees it
        from qdiff.quant.text_encoders import quantize_text_encoders

        for attr in quantize_text_encoders(pipe, recipe.text_encoders):
            attach_text_encoder_save(getattr(pipe, attr))
    specs = layer_specs(adapter.layers(den), recipe, plan)
    if not specs:
        raise QdiffError("nothing to quantize: the recipe/plan selects no layer of this model")
    probe = _probe_bos(pipe, den, adapter, specs, recipe, prompts) if recipe.bos_aware else None
    layers = apply_specs(den, specs, {n: probe.mode for n in probe.embeddings} if probe else None)
    for name, emb in (probe.embeddings if probe else {}).items():
        layers[name].set_bos(probe.mode, emb)
    static = {name: m for name, m in layers.items() if m.qcfg.static_act}
    if static and ranges is not None:
        for name, qparams in static_qparams(static, recipe, ranges).items():
            static[name].set_act_qparams(*qparams)
    elif static:
        _calibrate_static(pipe, static, recipe, prompts, progress)
    for m in progress_bar(layers.values(), desc="packing weights", unit="layer", enabled=progress):
        m.kernel = recipe.kernel
        m.freeze()
    base = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    set_info(den, QuantInfo(recipe=recipe, plan=plan, base_model=base or None))
    attach_save(den)  # pipe.save_pretrained writes a qdiff export (qdiff.export.pretrained)
    attach_pipeline_hooks(pipe)  # load_lora_weights on quantized layers (qdiff.lora.pipeline)
    if recipe.qsched.enabled:  # Q-Sched on the quantized model; prints whether the held-out prompts kept it
        print(fit_schedule(pipe, recipe, progress=progress).message)
    return pipe


def _checked_loras(recipe: Recipe, den, loras) -> Recipe:
    """The recipe with ``loras`` (None: its own) checked and hashed; not again when exactly these are fused into
    ``den`` already (a CLI run hashed them before fusing)."""
    if loras is None and fused_loras(den) == recipe.loras:
        return recipe
    return with_loras(recipe, loras)


def _check_prompts(prompts: list[str] | None) -> list[str] | None:
    """``None`` (the recipe's calibration prompts) or a non-empty list of strings."""
    if prompts is None:
        return None
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise QdiffError("prompts: expected a list of prompt strings (None: the recipe's calibration prompts)")
    if not prompts:
        raise QdiffError("prompts: empty list; pass at least one prompt or None for the recipe's calibration prompts")
    return list(prompts)


def _probe_bos(pipe, den, adapter, specs, recipe: Recipe, prompts: list[str] | None):
    """Check whether token 0 of the cross-attention K/V input is prompt-independent (see ``qdiff.quant.bos``)."""
    from qdiff.calib.bos_probe import kv_layers, probe_bos, probe_prompts

    kv = kv_layers(den, adapter, list(specs))
    if not kv:
        return None
    prompts = prompts or load_prompts(recipe.calibration.prompts, recipe.calibration.num_prompts)
    return probe_bos(pipe, kv, probe_prompts(prompts), recipe.sampler)


def _calibrate_static(pipe, layers: dict, recipe: Recipe, prompts: list[str] | None, progress: bool) -> None:
    """Record per-tensor input ranges of ``layers`` over the sampler, then set their (scale, zero-point)."""
    cal, act = recipe.calibration, recipe.activations
    prompts = prompts or load_prompts(cal.prompts, cal.num_prompts)
    kwargs = {"momentum": act.momentum} if act.observer == "ema" else {}
    if act.observer == "percentile":
        kwargs = {"percentile": act.percentile}

    def make(name: str):  # split layers: one observer per input part
        q = layers[name].qcfg
        if not q.split_act:
            return make_observer(act.observer, **kwargs)
        return SplitObserver((make_observer(act.observer, **kwargs), make_observer(act.observer, **kwargs)), q.a_split)

    with observing(layers, make, find_denoiser(pipe)[1]) as observed:
        desc = "calibrating activations" if progress else None
        draw(pipe, prompts, None, recipe.sampler, cal.batch_size, output_type="latent", desc=desc,
             on_batch=observed.new_call, keep=False)  # fmt: skip
    for name, layer in layers.items():
        obs = observed.observers[name]
        if not obs.initialized:
            raise QdiffError(f"layer {name!r} saw no input during calibration; it cannot use static activations")
        layer.set_act_qparams(*obs.qparams(layer.qcfg.a_bits, symmetric=False))


def calibrate(
    pipe,
    recipe: Recipe | str | Path | None = None,
    *,
    work_dir: str | Path | None = None,
    progress: bool = True,
    offload: str | None = None,
    loras=None,
):
    """MixDQ-style calibration of a float ``pipe``: capture ranges, per-layer sensitivity, ILP bit allocation.

    Returns a :class:`qdiff.calib.run.CalibrationResult` (``.plan`` feeds :func:`quantize`, ``.stats`` its
    ``ranges=``; ``.save(folder)`` writes everything). ``work_dir`` makes the run resumable. ``offload``
    (``"none"``, ``"model"``, ``"sequential"``; default: the recipe's ``calibration.offload``) bounds memory, see
    :mod:`qdiff.calib.offload`. ``loras`` (default: the recipe's) are fused into ``pipe`` first, so the ranges,
    sensitivities and plan are those of the model that will run; the result's recipe records them (sha256).
    """
    import dataclasses

    from qdiff.calib.run import calibrate as run_calibration

    _, den = find_denoiser(pipe)
    if get_info(den) is not None or quantized_layers(den):
        raise QdiffError("calibrate needs the float pipeline; this one is already quantized")
    recipe = _checked_loras(as_recipe(recipe), den, loras)
    if offload is not None:
        recipe = recipe.replace(calibration=dataclasses.replace(recipe.calibration, offload=offload))
    fuse_recipe_loras(pipe, recipe)  # once: a CLI run may have fused them already
    return run_calibration(pipe, recipe, work_dir=work_dir, progress=progress)


def save(pipe, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Export a quantized pipeline to ``out_dir`` (atomic: written to a temp folder, then renamed)."""
    from qdiff.export.save import save_quantized

    return save_quantized(pipe, out_dir, overwrite=overwrite)


def load(path: str | Path, device: str | None = None, kernel: str | None = None, *, dtype=None):
    """Load an export folder into a ready pipeline (no network, no original checkpoint needed).

    The pipeline is placed as every qdiff command places it (:func:`qdiff.export.resolve.place`): on CPU (the
    default ``device``) every float part of every component runs in ONE compute dtype — a float32 export stays
    float32, a float16 one runs in bfloat16 on CPUs with native bf16 matmuls, else float32; on another device the
    stored dtypes are kept. ``dtype`` (``torch.bfloat16``, ``"float32"``, ...) overrides (``"float16"`` keeps a
    float16 export as stored, e.g. to save it again unchanged). Quantized layers keep their integer codes and fp32
    scales. An OpenVINO folder (:func:`qdiff.export_openvino`) loads on OpenVINO instead
    (:func:`qdiff.engines.openvino.runtime.load_openvino`). ``kernel``: backend preference of the frozen layers
    instead of the export recipe's (``auto``,
    ``cpu_int8``, ``triton``, ``torch``); ``"torch"`` keeps no prepacked int8 copy beside the stored codes (least
    memory, slower). An export saved with unfused LoRA adapters loads without them (one warning line;
    :func:`qdiff.lora.load_saved_loras` puts them back).
    """
    from qdiff.config.dtypes import as_torch_dtype
    from qdiff.engines.openvino import is_openvino_folder
    from qdiff.export.load import load_export
    from qdiff.export.resolve import place

    if is_openvino_folder(path):  # an OpenVINO folder (qdiff.export_openvino): runs on OpenVINO
        if kernel is not None or dtype is not None:
            raise QdiffError(f"{path}: an OpenVINO folder takes no kernel or dtype (its precisions: load_openvino)")
        from qdiff.engines.openvino.runtime import load_openvino

        return load_openvino(path)
    dtype = as_torch_dtype(dtype)  # a bad name fails before any work
    defer_bitsandbytes()  # diffusers would import it (and print its notices) although nothing here uses it
    pipe = load_export(path, device=device, kernel=kernel)
    place(pipe, device or "cpu", dtype)
    attach_pipeline_hooks(pipe)
    _note_saved_loras(Path(path))
    return pipe


def _note_saved_loras(folder: Path) -> None:
    """One warning line when the export carries unfused LoRA adapters (loaded without them; docs/lora.md)."""
    import logging

    entry, _ = saved_entry(folder)
    if entry:
        names = ", ".join(a["name"] for a in entry["adapters"])
        logging.getLogger("qdiff").warning(
            "%s: loaded without its unfused LoRA adapters (%s, in lora/); put them back with "
            "qdiff.lora.load_saved_loras(pipe, %r)",
            folder,
            names,
            str(folder),
        )


def fit_schedule(
    pipe,
    recipe: Recipe | str | Path | None = None,
    *,
    prompts: list[str] | str | Path | None = None,
    alignment=None,
    quality=None,
    log: str | Path | None = None,
    progress: bool = True,
):
    """Fit Q-Sched coefficients (``recipe.qsched``) on the quantized ``pipe`` with the reference-free JAQ loss.

    Installs the fitted schedule on ``pipe.scheduler`` when the held-out prompts confirm a gain (else leaves
    the plain scheduler) and returns a :class:`qdiff.sched.fit.FitResult`. ``alignment``/``quality`` override
    the recipe's scorers with a spec string or a scorer object; ``log`` is a JSONL file that makes the fit
    resumable. The full-precision model is never run.
    """
    from qdiff.sched.run import fit_pipeline

    recipe = as_recipe(recipe)
    if get_info(find_denoiser(pipe)[1]) is None:
        raise QdiffError("fit_schedule needs a quantized pipeline: quantize it (qdiff.quantize) or load an export")
    return fit_pipeline(pipe, recipe, prompts, alignment=alignment, quality=quality, log=log, progress=progress)
