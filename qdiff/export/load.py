"""Load a qdiff export folder back into a working diffusers pipeline: offline, safetensors/JSON only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qdiff.config.layer import LayerQuant
from qdiff.config.plan import Plan
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.export.manifest import read_manifest, verify_files
from qdiff.quant.transform import QuantInfo, build_frozen_shells, set_info

# Denoiser classes an export may name (each has a qdiff architecture adapter).
_DENOISERS = ("UNet2DConditionModel", "PixArtTransformer2DModel", "FluxTransformer2DModel", "SD3Transformer2DModel")


def _denoiser_class(name: str, source: Path):
    if name not in _DENOISERS:
        raise QdiffError(f"{source}: denoiser class {name!r} is not supported (supported: {', '.join(_DENOISERS)})")
    import diffusers

    return getattr(diffusers, name)


def load_denoiser(folder: Path, manifest: dict) -> torch.nn.Module:
    """Rebuild the quantized denoiser: float architecture on meta → frozen shells → assign safetensors tensors."""
    from accelerate import init_empty_weights

    den_info = manifest["denoiser"]
    attr = den_info.get("attr")
    config_path = folder / str(attr) / "config.json"
    weights_path = folder / str(den_info.get("weights"))
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QdiffError(f"{config_path}: cannot read denoiser config ({exc})") from None
    cls = _denoiser_class(str(den_info.get("class")), folder / "qdiff.json")
    with init_empty_weights(include_buffers=False):
        den = cls.from_config(config)
    try:
        specs = {name: LayerQuant.from_dict(entry["quant"]) for name, entry in manifest["layers"].items()}
        bos = {name: entry["bos"] for name, entry in manifest["layers"].items() if entry.get("bos")}  # optional
        build_frozen_shells(den, specs, bos)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise QdiffError(f"{folder / 'qdiff.json'}: layer table does not match the denoiser config ({exc})") from None
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise QdiffError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    expected = den.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        what = "missing tensor" if missing else "unexpected tensor"
        raise QdiffError(f"{weights_path}: {what} {key!r} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, ref in expected.items():
        got = tensors[key]
        # Float parameters keep the dtype they were saved in (the meta model is built in float32);
        # packed weights, zero-points and the fp32 quantization scales must match exactly.
        exact = not ref.is_floating_point() or key.rsplit(".", 1)[-1] in ("w_scale", "a_scale")
        same_kind = got.dtype == ref.dtype or (not exact and got.is_floating_point())
        if tuple(got.shape) != tuple(ref.shape) or not same_kind:
            raise QdiffError(
                f"{weights_path}: tensor {key!r} has shape {tuple(got.shape)} {got.dtype}, "
                f"expected {tuple(ref.shape)} {ref.dtype}"
            )
    den.load_state_dict(tensors, strict=True, assign=True)
    leftover = [n for n, t in list(den.named_parameters()) + list(den.named_buffers()) if t.is_meta]
    if leftover:
        raise QdiffError(f"{weights_path}: tensor {leftover[0]!r} was not restored")
    return den.eval()


def load_export(path: str | Path, device: str | torch.device | None = None):
    """Load an export folder written by :func:`qdiff.save`; verifies version, hashes and shapes first."""
    folder = Path(path)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    den = load_denoiser(folder, manifest)
    recipe = Recipe.from_dict(manifest.get("recipe") or {})
    plan = Plan.from_dict(manifest["plan"]) if manifest.get("plan") else None
    for module in den.modules():
        if hasattr(module, "kernel"):
            module.kernel = recipe.kernel
    set_info(den, QuantInfo(recipe=recipe, plan=plan, base_model=manifest.get("base_model")))
    from diffusers import DiffusionPipeline

    from qdiff.config.dtypes import as_torch_dtype, dtype_kwargs
    from qdiff.export.text_encoders import load_text_encoders

    attr = manifest["denoiser"]["attr"]
    dtype = dtype_kwargs(as_torch_dtype(manifest.get("torch_dtype", "float32")))
    encoders = load_text_encoders(folder, manifest)  # W8A8 CLIP encoders (optional manifest field)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(folder), **{attr: den}, **encoders, local_files_only=True, use_safetensors=True, **dtype
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QdiffError(f"{folder}: cannot load the pipeline components ({first})") from None
    _apply_schedule(pipe, folder, manifest)
    if device is not None:
        pipe.to(device)
    return pipe


def _apply_schedule(pipe, folder: Path, manifest: dict) -> None:
    """Re-install the Q-Sched coefficients; ``qdiff.json`` and ``scheduler/qsched.json`` must agree."""
    from qdiff.sched.qsched import SCHEDULE_FILE, Schedule, apply_schedule

    sidecar = folder / "scheduler" / SCHEDULE_FILE
    entry = manifest.get("schedule")
    if entry is None:
        if sidecar.is_file():
            raise QdiffError(f"{sidecar}: present but qdiff.json has no schedule")
        return
    schedule = Schedule.from_dict(entry, source=f"{folder / 'qdiff.json'}: schedule")
    if not sidecar.is_file() or Schedule.load(sidecar).to_dict() != schedule.to_dict():
        raise QdiffError(f"{sidecar}: missing or different from the schedule in qdiff.json")
    apply_schedule(pipe, schedule)
