"""Turn a model spec string into a diffusers pipeline, without ever downloading anything.

Specs, tried in this order:

* ``builtin:<name>`` — a pipeline built in code (``builtin:tiny-sd``, ``builtin:tiny-sdxl``, ...), declared with
  its family in ``qdiff/models/families.py``;
* a local folder — a qdiff export (it holds ``qdiff.json``) or a diffusers pipeline folder;
* a Hugging Face hub id (``org/name``) — only if it is already in the local Hugging Face cache.

Every failure is a :class:`~qdiff.errors.QdiffError` with a one-line message.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from qdiff.config.dtypes import as_torch_dtype, dtype_kwargs
from qdiff.errors import QdiffError
from qdiff.models.families import current_registry
from qdiff.models.registry import BUILTIN_PREFIX
from qdiff.utils.lazy_imports import defer_bitsandbytes

EXPORT_MARKER = "qdiff.json"


def available_builtins() -> list[str]:
    """``builtin:`` names (without the prefix), from the family registry (``qdiff/models/families.py``)."""
    return sorted(current_registry().builtins)


def _builtin_factory(name: str) -> Callable[[], object]:
    builtins = current_registry().builtins  # name -> "module:callable", imported only when asked for
    if name not in builtins:
        listed = ", ".join(BUILTIN_PREFIX + n for n in available_builtins())
        raise QdiffError(f"unknown builtin model {BUILTIN_PREFIX + name!r}; available builtins: {listed}")
    module, _, attr = builtins[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise QdiffError(f"builtin:{name} is unavailable ({_one_line(exc)})") from exc


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_pretrained(source: str, torch_dtype, cache_dir=None):
    from diffusers import DiffusionPipeline

    from qdiff.models.autoencoder_tiny import quiet_tiny_vae

    extra = dtype_kwargs(torch_dtype)
    if cache_dir is not None:
        extra["cache_dir"] = str(cache_dir)
    with quiet_tiny_vae():  # diffusers' two false alarms about a Shapes (AutoencoderTiny) VAE
        pipe = DiffusionPipeline.from_pretrained(source, local_files_only=True, use_safetensors=True, **extra)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~", "\\"))
        or os.path.isabs(spec)
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )


def load_pipeline(
    spec: str, torch_dtype=None, *, cache_dir: str | Path | None = None, config: str | Path | None = None
):
    """Load a pipeline from ``builtin:<name>``, a local folder, or a hub id already in the local cache.

    ``torch_dtype`` (``torch.float16`` or a name: ``"float16"``, ``"bf16"``, ...) is applied to builtins and
    diffusers folders; a qdiff export keeps the dtypes it was saved with. Nothing is ever downloaded and
    nothing is unpickled. ``cache_dir`` overrides the Hugging Face hub cache folder for hub ids. A ``.safetensors``
    single-file checkpoint is loaded with the pipeline configs of ``config`` (a diffusers folder) or of the
    ``model_index.json`` beside it (``qdiff.models.single_file``).
    """
    defer_bitsandbytes()  # diffusers would import bitsandbytes (and its notices) although nothing here uses it
    spec = str(spec).strip()
    torch_dtype = as_torch_dtype(torch_dtype)
    if not spec:
        raise QdiffError("empty model spec: pass builtin:<name>, a local pipeline folder, or a cached hub id")

    if spec.startswith(BUILTIN_PREFIX):
        factory = _builtin_factory(spec[len(BUILTIN_PREFIX) :])
        pipe = factory()
        if torch_dtype is not None:
            pipe = pipe.to(dtype=torch_dtype)
        pipe.register_to_config(_name_or_path=spec)  # recorded as base_model in exports
        return pipe

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / EXPORT_MARKER).is_file():
            from qdiff.export.load import load_export  # lazy: the export module pulls in the quantized layers

            try:
                return load_export(path)
            except QdiffError:
                raise
            except Exception as exc:
                raise QdiffError(f"could not load the qdiff export in '{spec}': {_one_line(exc)}") from exc
        if not (path / "model_index.json").is_file():
            raise QdiffError(
                f"folder '{spec}' is neither a diffusers pipeline (no model_index.json) "
                f"nor a qdiff export (no {EXPORT_MARKER})"
            )
        try:
            return _from_pretrained(str(path), torch_dtype)
        except QdiffError:
            raise
        except Exception as exc:
            raise QdiffError(
                f"could not load the diffusers pipeline in '{spec}' (safetensors only, offline): {_one_line(exc)}"
            ) from exc

    builtins = ", ".join(BUILTIN_PREFIX + n for n in available_builtins())
    if path.is_file():
        from qdiff.models.single_file import load_single_file

        return load_single_file(path, config, dtype_kwargs(torch_dtype))
    if path.exists():
        raise QdiffError(
            f"model '{spec}' is a file, not a pipeline folder; pass a diffusers folder or one of {builtins}"
        )
    if _looks_like_path(spec):
        raise QdiffError(f"model folder '{spec}' does not exist; pass an existing folder or one of {builtins}")

    if not _in_hf_cache(spec, cache_dir):
        raise QdiffError(
            f"model '{spec}' not found: not a local folder, not a builtin ({builtins}), and not in the local "
            f"Hugging Face cache (downloads are disabled); download it with `huggingface-cli download {spec}` on a "
            "machine with network and pass the folder"
        )
    try:
        return _from_pretrained(spec, torch_dtype, cache_dir)
    except Exception as exc:
        raise QdiffError(
            f"model '{spec}' is in the local Hugging Face cache but could not be loaded offline with safetensors "
            f"weights ({_one_line(exc, 200)}); download the full snapshot with `huggingface-cli download {spec}` "
            "and pass the folder"
        ) from exc


def place(pipe, device="cpu", dtype=None):
    """Move ``pipe`` to ``device`` with ONE floating compute dtype for every component; returns that dtype.

    On CUDA the pipeline keeps its dtypes unless ``dtype`` is given. On CPU the dtype comes from
    :func:`qdiff.config.dtypes.cpu_compute_dtype` (a float16 folder runs in bfloat16 where the CPU has native bf16
    matmuls, else float32). Quantized layers keep their integer codes and fp32 scales whatever the dtype.
    """
    import torch

    from qdiff.config.dtypes import cpu_compute_dtype
    from qdiff.utils.machine import cpu_flags

    dev = torch.device(device)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    present = {p.dtype for m in modules for p in m.parameters() if p.is_floating_point()}
    if dev.type == "cpu":
        target = cpu_compute_dtype(present, dtype, cpu_flags())
    else:
        target = as_torch_dtype(dtype) if dtype is not None else None
    for module in modules:
        if target is None or _foreign_quantized(module):  # bitsandbytes T5: its own dtypes, moved only
            module.to(dev)
        else:
            _cast(module, dev, target)
    return target if target is not None else (next(iter(present)) if len(present) == 1 else None)


def _foreign_quantized(module) -> bool:
    """Whether ``module`` was quantized by another library (bitsandbytes, ...), which owns its dtypes.

    A qdiff denoiser's config also carries a ``quantization_config`` (``quant_method: "qdiff"``, written into every
    export for the diffusers backend), but its frozen layers keep their codes and fp32 scales under ``.to(dtype)``
    (``QuantLayer._apply``) and its float parts must follow the compute dtype like any other float module.
    """
    config = getattr(getattr(module, "config", None), "quantization_config", None)
    if config is None:
        return False
    from qdiff.export.card import QUANT_METHOD

    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return method != QUANT_METHOD


def _cast(module, device, dtype) -> None:
    """``module.to(device, dtype)``, keeping a diffusers model's ``_keep_in_fp32_modules`` in float32 (diffusers
    warns on every ``.to(dtype)`` of a model, listing those modules; with none to keep the warning says nothing)."""
    import logging

    import torch

    keep = [
        name
        for name, _ in module.named_modules()
        if any(k in name for k in (getattr(module, "_keep_in_fp32_modules", None) or ()))
    ]
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        module.to(device=device, dtype=dtype)
    finally:
        logger.setLevel(level)
    for name in keep:
        module.get_submodule(name).to(torch.float32)


def _in_hf_cache(repo_id: str, cache_dir=None) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` with a ``model_index.json``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(
            repo_id, "model_index.json", cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except Exception:  # invalid repo id, unreadable cache, ...
        return False
    return isinstance(found, str) and os.path.isfile(found)
