"""``pipe.save_pretrained(DIR)`` of a qdiff-quantized pipeline writes a qdiff export, never a float folder.

diffusers' ``DiffusionPipeline.save_pretrained`` saves one component folder at a time through each component's own
``save_pretrained`` and writes ``model_index.json`` last; its quantizer hooks (``is_serializable``,
``get_state_dict_and_metadata``) never see the folder, so they cannot write a qdiff export (its ``qdiff.json`` hashes
every file of the pipeline). Instead every denoiser qdiff produces (:func:`qdiff.quantize`, :func:`qdiff.load`, the
diffusers backend) carries an instance ``save_pretrained`` (:func:`attach_save`) that diffusers calls for that
component. When its caller is the pipeline's ``save_pretrained`` (the frame that called it), it writes the whole
export of that pipeline (:func:`qdiff.export.save.write_export`) into a temp folder inside ``DIR`` and moves it into
place, ``qdiff.json`` last; the components diffusers saves after it are rewritten with the same bytes by the same
``save_pretrained`` calls, and ``model_index.json`` by the same ``save_config``, so the folder stays a valid export
(every load checks every hash). Quantized text encoders get a hook that leaves their folder to the denoiser's export.
Anything else (the denoiser saved alone, ``variant=``, ``max_shard_size=``, ``push_to_hub=``, pickle) is a one-line
``QdiffError`` naming ``qdiff.save``.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

from torch import nn

from qdiff.errors import QdiffError
from qdiff.export.card import CARD
from qdiff.export.checkpoint import MODEL_INDEX
from qdiff.export.manifest import MANIFEST
from qdiff.lora.saved import LORA_FOLDER

_TMP_PREFIX = ".qdiff-tmp-"  # the temp folder inside DIR (a killed save leaves it, and no qdiff.json)


def attach_save(module: nn.Module) -> None:
    """Give a qdiff-quantized denoiser the ``save_pretrained`` that writes a qdiff export, and the LoRA entry points
    that wrap its quantized layers (:mod:`qdiff.lora.inject`); idempotent."""
    from qdiff.lora.inject import attach_lora_hooks

    module.save_pretrained = types.MethodType(_save_denoiser, module)
    attach_lora_hooks(module)


def attach_text_encoder_save(encoder: nn.Module) -> None:
    """Give a quantized text encoder the ``save_pretrained`` that leaves its folder to the pipeline's export, and the
    LoRA entry points (:mod:`qdiff.lora.inject`)."""
    from qdiff.lora.inject import attach_lora_hooks

    encoder.save_pretrained = types.MethodType(_save_text_encoder, encoder)
    attach_lora_hooks(encoder)


def _pipeline_call(module: nn.Module, target: Path) -> tuple[Any, Path, dict[str, Any]] | None:
    """``(pipeline, DIR, its save arguments)`` when the caller of the hook is ``DiffusionPipeline.save_pretrained``
    saving ``module`` as its component ``target`` (``DIR/<name>``); None otherwise."""
    from diffusers import DiffusionPipeline

    frame = inspect.currentframe()
    try:
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None  # hook's caller
        if caller is None or caller.f_code is not DiffusionPipeline.save_pretrained.__code__:
            return None
        call = dict(caller.f_locals)
    finally:
        del frame
    pipe, root = call.get("self"), Path(call.get("save_directory", ""))
    if not isinstance(pipe, DiffusionPipeline) or root / target.name != target:
        return None
    if getattr(pipe, target.name, None) is not module:
        return None
    return pipe, root, call


def _save_denoiser(den: nn.Module, save_directory, safe_serialization: bool = True, variant: str | None = None,
                   max_shard_size=None, **kwargs: Any) -> None:  # fmt: skip
    """The quantized denoiser's ``save_pretrained``: the pipeline's qdiff export when the pipeline saves it."""
    target = Path(save_directory)
    found = _pipeline_call(den, target)
    if found is None:
        raise QdiffError(
            f"{target}: a qdiff-quantized {type(den).__name__} is saved with its pipeline (pipe.save_pretrained(DIR) "
            "or qdiff.save(pipe, DIR)); its export needs the manifest of every pipeline file"
        )
    pipe, root, call = found
    refused = [
        (not safe_serialization, "safe_serialization=False (a qdiff export holds no pickle)"),
        (variant is not None, f"variant={variant!r}"),
        (max_shard_size is not None, f"max_shard_size={max_shard_size!r} (qdiff shards the denoiser at 2 GB)"),
        (bool(call.get("push_to_hub")), "push_to_hub=True (diffusers rewrites README.md after the export is hashed)"),
        (bool(call.get("use_flashpack")), "use_flashpack=True"),
    ]
    for bad, what in refused:
        if bad:
            raise QdiffError(
                f"pipe.save_pretrained({root}): {what} is not supported for a qdiff-quantized pipeline; call it "
                "without it or use qdiff.save(pipe, DIR)"
            )
    save_into(pipe, root)


def _save_text_encoder(encoder: nn.Module, save_directory, *args: Any, **kwargs: Any) -> None:
    """A quantized text encoder's ``save_pretrained``: nothing when its pipeline saves it (the denoiser's export
    writes its folder), transformers' own save for bitsandbytes ones otherwise; W8A8 ones only save in an export."""
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.text_encoders import text_encoder_mode

    found = _pipeline_call(encoder, Path(save_directory))
    if found is not None:
        den = find_denoiser(found[0])[1]
        if "save_pretrained" in vars(den):  # qdiff's denoiser hook writes this folder too
            return None
    if text_encoder_mode(encoder) == "w8a8":
        raise QdiffError(
            f"{save_directory}: a qdiff W8A8 {type(encoder).__name__} is saved with its pipeline "
            "(pipe.save_pretrained(DIR) or qdiff.save(pipe, DIR))"
        )
    return type(encoder).save_pretrained(encoder, save_directory, *args, **kwargs)


def save_into(pipe, root: Path) -> None:
    """Write ``pipe``'s export into ``root``, the folder diffusers is saving the pipeline into.

    ``root`` may hold only what a pipeline save writes (component folders, ``model_index.json``) and an earlier
    export's ``qdiff.json`` / ``README.md``; the export is written into a temp folder inside it, the old manifest
    is removed, each entry replaces its namesake and ``qdiff.json`` comes last, so an interrupted save leaves no
    manifest (nothing that loads)."""
    from qdiff.export.save import write_export
    from qdiff.quant.text_encoders import TEXT_ENCODER_ATTRS, text_encoder_mode

    root = Path(root)
    allowed = {*pipe.components, MODEL_INDEX, MANIFEST, CARD, LORA_FOLDER}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)  # left by a killed save
        elif entry.name not in allowed:
            raise QdiffError(
                f"{entry}: not part of the pipeline; a qdiff export is the whole folder, save into a new or empty one"
            )
    for attr in TEXT_ENCODER_ATTRS:  # those diffusers saves after the denoiser must not overwrite the export
        encoder = getattr(pipe, attr, None)  # (quantized, or with a LoRA that transformers would save alone)
        if isinstance(encoder, nn.Module) and (text_encoder_mode(encoder) or getattr(encoder, "peft_config", None)):
            attach_text_encoder_save(encoder)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        write_export(pipe, tmp)
        (root / MANIFEST).unlink(missing_ok=True)
        for entry in sorted(tmp.iterdir()):
            if entry.name == MANIFEST:
                continue
            target = root / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        os.replace(tmp / MANIFEST, root / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
