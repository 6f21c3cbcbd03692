"""Write a quantized pipeline as a self-contained diffusers-layout folder, atomically.

Layout::

    out/
      model_index.json, scheduler/, tokenizer/, text_encoder/, vae/ …   diffusers layout (safetensors)
      unet/ (or transformer/)  config.json + qdiff.safetensors          packed weights, scales, FP rest
                               (over 2 GB: qdiff-0000K-of-0000N.safetensors + qdiff.safetensors.index.json)
      qdiff.json                                                        manifest (see manifest.py)

The denoiser's tensors are written one at a time into planned safetensors files (``qdiff.export.shards``), so
saving needs no copy of the state dict. ``qdiff.export.stream`` writes the same layout without loading the model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from qdiff.errors import QdiffError
from qdiff.export.card import write_card, write_denoiser_files
from qdiff.export.manifest import (
    MAX_SHARD_BYTES,
    WEIGHTS_FILE,
    WEIGHTS_METADATA,
    build_manifest,
    hash_tree,
    layer_entry,
    write_manifest,
)
from qdiff.export.shards import ShardedWriter, TensorSpec
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.models.autoencoder_tiny import clean_config
from qdiff.quant.transform import get_info, quantized_layers
from qdiff.utils.perms import give_usual_mode


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; on success it becomes ``out`` (an old ``out`` is replaced only with
    ``overwrite``), on any error or interrupt it is removed. A killed process leaves only a ``.<name>.tmp-*``
    folder, never a partial ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise QdiffError(f"output folder {out} already exists (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        give_usual_mode(tmp, directory=True)  # mkdtemp's 0700 would stay on the export
    except OSError as exc:
        raise QdiffError(f"cannot write to {parent}: {exc.strerror}") from None
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_state_dict(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: float = MAX_SHARD_BYTES) -> str:
    """Write ``state`` into ``folder`` as ``qdiff.safetensors`` (or shards + index), one tensor at a time, no copy
    of the state dict; returns the file a reader opens (the single file or the index)."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    writer = ShardedWriter(folder, WEIGHTS_FILE, specs, max_shard_bytes, WEIGHTS_METADATA)
    try:
        for key, tensor in state.items():
            writer.write(key, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.entry_file


def save_quantized(
    pipe, out_dir: str | Path, overwrite: bool = False, max_shard_bytes: float = MAX_SHARD_BYTES
) -> Path:
    """Export ``pipe`` (quantized by :func:`qdiff.quantize`) to ``out_dir``; returns the folder."""
    out = Path(out_dir)
    _quantized_denoiser(pipe)  # before the temp folder is made
    with atomic_folder(out, overwrite) as tmp:
        write_export(pipe, tmp, max_shard_bytes)
    return out


def _quantized_denoiser(pipe):
    attr, den = find_denoiser(pipe)
    info = get_info(den)
    if info is None:
        raise QdiffError("pipeline is not quantized: call qdiff.quantize(pipe, recipe) before saving")
    return attr, den, info


def write_export(pipe, folder: Path, max_shard_bytes: float = MAX_SHARD_BYTES) -> None:
    """Write ``pipe``'s export into the empty folder ``folder`` (not atomic: callers write into a temp folder and
    move it, as :func:`save_quantized` and ``pipe.save_pretrained`` (``qdiff.export.pretrained``) do)."""
    from qdiff.lora.saved import detached_loras

    found = _quantized_denoiser(pipe)
    with detached_loras(pipe) as adapters:  # unfused LoRAs: the export without them, each adapter beside it
        _write(pipe, *found, Path(folder), max_shard_bytes, adapters)


def _schedule(pipe) -> dict | None:
    from qdiff.sched.qsched import get_schedule

    schedule = get_schedule(pipe)
    return None if schedule is None else schedule.to_dict()


def _write(pipe, attr: str, den, info, tmp: Path, max_shard_bytes: float, adapters=None) -> None:
    from qdiff.export.text_encoders import save_text_encoder
    from qdiff.quant.text_encoders import TEXT_ENCODER_ATTRS, text_encoder_mode

    text_encoders = {}  # quantized text encoders (recipe text_encoders section): manifest entries
    for name, component in pipe.components.items():
        if component is None or name == attr:
            continue
        if name in TEXT_ENCODER_ATTRS and isinstance(component, torch.nn.Module) and text_encoder_mode(component):
            text_encoders[name] = save_text_encoder(component, tmp / name, name)
            continue
        if hasattr(component, "save_pretrained"):
            kwargs = {"safe_serialization": True} if isinstance(component, torch.nn.Module) else {}
            component.save_pretrained(tmp / name, **kwargs)
            clean_config(tmp / name)  # no key diffusers itself adds and then rejects (AutoencoderTiny)
    pipe.save_config(tmp)  # model_index.json
    (tmp / attr).mkdir()
    den.save_config(tmp / attr)  # config.json of the float architecture
    weights = write_state_dict(den.state_dict(), tmp / attr, max_shard_bytes)
    layers = quantized_layers(den)
    first_float = next((p for p in den.parameters() if p.is_floating_point()), None)
    manifest = build_manifest(
        base_model=info.base_model,
        pipeline_class=type(pipe).__name__,
        torch_dtype=str(first_float.dtype).removeprefix("torch.") if first_float is not None else "float32",
        denoiser={
            "attr": attr,
            "class": type(den).__name__,
            "family": get_adapter(den).family,
            "weights": f"{attr}/{weights}",
        },  # fmt: skip
        recipe=info.recipe.to_dict(),
        plan=None if info.plan is None else info.plan.to_dict(),
        layers={name: layer_entry(m) for name, m in layers.items()},
        schedule=_schedule(pipe),
        files={},
        text_encoders=text_encoders,
        lora_adapters=adapters.write(tmp) if adapters is not None else None,  # lora/*.safetensors (qdiff.lora.saved)
    )
    write_denoiser_files(tmp / attr, weights, info.recipe.name)  # quantization_config + diffusers index
    write_card(tmp, manifest)  # README.md, hashed with the rest
    manifest["files"] = hash_tree(tmp)
    write_manifest(tmp, manifest)
