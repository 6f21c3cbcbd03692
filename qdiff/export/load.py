"""Load a qdiff export folder back into a working diffusers pipeline: offline, safetensors/JSON only.

Mapped loading: the denoiser is built on the meta device with frozen shells, then every tensor is read on its own
from its shard (``qdiff.export.checkpoint``: plain reads into fresh tensors, no memory map kept) and assigned in
place, so no state dict sits beside the model and peak memory is about the model plus one module's tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qdiff.backends.registry import REGISTRY
from qdiff.config.plan import Plan
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.export.checkpoint import MODEL_INDEX, CheckpointReader, open_checkpoint
from qdiff.export.checks import check_model_index, inside, json_object
from qdiff.export.manifest import MANIFEST, read_layers, read_manifest, verify_files
from qdiff.export.pretrained import attach_save, attach_text_encoder_save
from qdiff.models.families import current_registry
from qdiff.quant.transform import QuantInfo, build_frozen_shells, set_info
from qdiff.utils.finite import NonFiniteError, check_tensor


def _denoiser_class(name: str, attr: str, source: Path):
    """The diffusers class of a denoiser the family registry declares (``qdiff/models/families.py``), checked
    against the pipeline attribute its architecture declares."""
    registry = current_registry()
    arch = next((a for a in registry.architectures if name in a.classes), None)
    if arch is None:
        supported = ", ".join(registry.denoiser_classes)
        raise QdiffError(f"{source}: denoiser class {name!r} is not supported (supported: {supported})")
    if attr != arch.attr:
        raise QdiffError(f"{source}: denoiser.attr {attr!r} does not match {name} (expected {arch.attr!r})")
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise QdiffError(f"{source}: denoiser class {name!r} is not in this diffusers ({diffusers.__version__})")
    return cls


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:limit]


def check_finite(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse NaN/Inf in any floating tensor (weights, scales, biases); the error names the file and tensor."""
    for key, t in tensors.items():
        try:
            check_tensor(t)
        except NonFiniteError as exc:
            raise QdiffError(f"{source}: tensor {key!r} has {exc} (corrupt export?)") from None


def _weights_reader(folder: Path, weights: str) -> CheckpointReader:
    """Open the denoiser tensors the manifest names: one ``.safetensors`` file or a ``.safetensors.index.json``
    whose shards sit beside it (headers only; hashes were checked by ``verify_files``)."""
    path = inside(folder, weights, f"{folder / MANIFEST}: denoiser.weights")
    if not path.name.endswith((".safetensors", ".safetensors.index.json")):
        raise QdiffError(f"{path}: not a .safetensors file or a .safetensors.index.json")
    return open_checkpoint(path)


def _check_tensors(reader: CheckpointReader, expected: dict[str, torch.Tensor], where: Path) -> None:
    """Names, shapes and dtypes from the file headers against the frozen shells, before any tensor is read."""
    missing = sorted(set(expected) - set(reader.keys()))
    unexpected = sorted(set(reader.keys()) - set(expected))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        what = "missing tensor" if missing else "unexpected tensor"
        raise QdiffError(f"{where}: {what} {key!r} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, ref in expected.items():
        shape, dtype = reader.shape(key), reader.dtype(key)
        # Float parameters keep the dtype they were saved in (the meta model is built in float32);
        # packed weights, zero-points and the fp32 quantization scales must match exactly.
        exact = not ref.is_floating_point() or key.rsplit(".", 1)[-1] in ("w_scale", "a_scale")
        same_kind = dtype == ref.dtype or (not exact and dtype.is_floating_point)
        if shape != tuple(ref.shape) or not same_kind:
            want = f"{tuple(ref.shape)} {ref.dtype}"
            raise QdiffError(f"{reader.file_of(key)}: tensor {key!r} has shape {shape} {dtype}, expected {want}")


def _assign(den: torch.nn.Module, reader: CheckpointReader, device: torch.device | str | None) -> None:
    """Fill the meta model module by module: read that module's own tensors, check them, move them to ``device``
    and assign them (``load_state_dict(assign=True)`` on the module, so its load hooks run). Holds one module's
    tensors beside the model; pre-order, so a parent's load never re-triggers an already loaded child."""
    own: dict[str, list[str]] = {}
    for key in den.state_dict():
        owner, _, leaf = key.rpartition(".")
        own.setdefault(owner, []).append(leaf)
    for name, module in den.named_modules(remove_duplicate=False):
        leaves = own.pop(name, None)
        if not leaves:
            continue
        tensors = {}
        for leaf in leaves:
            key = f"{name}.{leaf}" if name else leaf
            t = reader.get(key)
            check_finite({key: t}, reader.file_of(key))
            tensors[leaf] = t if device is None else t.to(device)
            del t
        module.load_state_dict(tensors, strict=False, assign=True)
        del tensors


def load_denoiser(folder: Path, manifest: dict, device: torch.device | str | None = None) -> torch.nn.Module:
    """Rebuild the quantized denoiser: float architecture on meta -> frozen shells -> each tensor read from its
    shard and assigned in place (moved to ``device`` as it is read). Peak memory: the model + one module."""
    from accelerate import init_empty_weights

    den_info = manifest["denoiser"]
    attr = den_info.get("attr")
    cls = _denoiser_class(str(den_info.get("class")), attr, folder / MANIFEST)  # before any path is built
    config_path = inside(folder, attr, f"{folder / MANIFEST}: denoiser.attr") / "config.json"
    try:
        config = json_object(config_path, config_path.read_bytes())
    except OSError as exc:
        raise QdiffError(f"{config_path}: cannot read denoiser config ({exc})") from None
    try:
        with init_empty_weights(include_buffers=False):
            den = cls.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise QdiffError(f"{config_path}: does not build a {cls.__name__} ({_one_line(exc)})") from None
    specs, bos = read_layers(manifest, folder / MANIFEST)  # versioned layer specs; errors name the layer
    try:
        build_frozen_shells(den, specs, bos)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise QdiffError(f"{folder / MANIFEST}: layer table does not match the denoiser config ({exc})") from None
    fill_denoiser(den, folder, str(den_info.get("weights")), device)
    return den.eval()


def fill_denoiser(den: torch.nn.Module, folder: Path, weights: str, device=None) -> None:
    """Read the export's denoiser tensors (``weights``: the file or shard index, relative to ``folder``) one module
    at a time into ``den``'s meta shells: names, shapes, dtypes and finiteness checked first, each tensor moved to
    ``device`` as it is read; every tensor of ``den`` must be restored."""
    with _weights_reader(folder, weights) as reader:
        _check_tensors(reader, den.state_dict(), folder / weights)
        _assign(den, reader, device)
    leftover = [n for n, t in list(den.named_parameters()) + list(den.named_buffers()) if t.is_meta]
    if leftover:
        raise QdiffError(f"{folder / weights}: tensor {leftover[0]!r} was not restored")
    if device is not None:
        den.to(device)  # the small non-persistent buffers built with the architecture


def _finish(den: torch.nn.Module, manifest: dict, kernel: str | None = None, source: Path | str = MANIFEST) -> Recipe:
    """Kernel preference (``kernel``, else the recipe's) and QuantInfo from the manifest (``source``, named in
    errors); returns the recipe."""
    try:
        recipe = Recipe.from_dict(manifest.get("recipe") or {})
    except QdiffError as exc:
        raise QdiffError(f"{source}: {exc}") from None
    plan = Plan.from_dict(manifest["plan"], source=f"{source}: plan") if manifest.get("plan") else None
    preference = recipe.kernel if kernel is None else kernel  # checked by the caller before any work
    for module in den.modules():
        if hasattr(module, "kernel"):
            module.kernel = preference
    set_info(den, QuantInfo(recipe=recipe, plan=plan, base_model=manifest.get("base_model")))
    attach_save(den)  # save_pretrained writes a qdiff export (qdiff.export.pretrained)
    return recipe


def load_denoiser_export(
    path: str | Path, device: str | torch.device | None = None, kernel: str | None = None
) -> torch.nn.Module:
    """The quantized denoiser alone from any export (the only thing a ``denoiser_only`` export holds)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if kernel is not None:
        REGISTRY.check(kernel)  # before any work
    verify_files(folder, manifest)
    den = load_denoiser(folder, manifest, device)
    _finish(den, manifest, kernel, folder / MANIFEST)
    return den


def load_export(path: str | Path, device: str | torch.device | None = None, kernel: str | None = None):
    """Load an export folder written by :func:`qdiff.save` or the streaming quantizer; verifies version, hashes and
    shapes first. ``device``: the denoiser is moved there tensor by tensor while loading, then the other parts.
    ``kernel``: the frozen layers' backend preference instead of the recipe's (e.g. ``"torch"``: no prepacked int8
    copies beside the stored codes, the least memory; ``docs/kernels.md``)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if kernel is not None:
        REGISTRY.check(kernel)  # before any work
    if manifest.get("denoiser_only"):
        raise QdiffError(
            f"{folder}: this export holds only the denoiser (quantized from a model folder, no VAE / text encoders / "
            "scheduler); load it with qdiff.export.load.load_denoiser_export, or stream a pipeline folder"
        )
    docs = verify_files(folder, manifest)  # every file hashed once; the JSON ones parsed (objects)
    if MODEL_INDEX not in docs:
        raise QdiffError(f"{folder / MODEL_INDEX}: missing (a pipeline export has one)")
    check_model_index(folder / MODEL_INDEX, docs[MODEL_INDEX])  # what diffusers reads first, checked first
    den = load_denoiser(folder, manifest, device)
    _finish(den, manifest, kernel, folder / MANIFEST)
    from diffusers import DiffusionPipeline

    from qdiff.config.dtypes import as_torch_dtype, dtype_kwargs
    from qdiff.export.text_encoders import load_text_encoders

    attr = manifest["denoiser"]["attr"]
    dtype = dtype_kwargs(as_torch_dtype(manifest.get("torch_dtype", "float32")))
    encoders = load_text_encoders(folder, manifest)  # W8A8 CLIP encoders (optional manifest field)
    for encoder in encoders.values():
        attach_text_encoder_save(encoder)
    from qdiff.models.autoencoder_tiny import quiet_tiny_vae

    try:
        with quiet_tiny_vae():  # diffusers' two false alarms about a Shapes (AutoencoderTiny) VAE
            pipe = DiffusionPipeline.from_pretrained(
                str(folder), **{attr: den}, **encoders, local_files_only=True, use_safetensors=True, **dtype
            )
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:  # a malformed config
        raise QdiffError(f"{folder}: cannot load the pipeline components ({_one_line(exc)})") from None
    _apply_schedule(pipe, folder, manifest)
    if device is not None:
        pipe.to(device)  # the other parts; the denoiser is there already
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
