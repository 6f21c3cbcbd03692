"""Write a quantized pipeline as a self-contained diffusers-layout folder, atomically.

Layout::

    out/
      model_index.json, scheduler/, tokenizer/, text_encoder/, vae/ …   diffusers layout (safetensors)
      unet/ (or transformer/)  config.json + qdiff.safetensors          packed weights, scales, FP rest
      qdiff.json                                                        manifest (see manifest.py)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import qdiff
from qdiff.errors import QdiffError
from qdiff.export.manifest import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS_FILE, hash_tree
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.quant.transform import get_info, quantized_layers


def _state_dict_for_file(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, no shared storage (safetensors refuses aliases)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_quantized(pipe, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Export ``pipe`` (quantized by :func:`qdiff.quantize`) to ``out_dir``; returns the folder."""
    out = Path(out_dir)
    attr, den = find_denoiser(pipe)
    info = get_info(den)
    if info is None:
        raise QdiffError("pipeline is not quantized: call qdiff.quantize(pipe, recipe) before saving")
    if out.exists() and not overwrite:
        raise QdiffError(f"output folder {out} already exists (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise QdiffError(f"cannot write to {parent}: {exc.strerror}") from None
    try:
        _write(pipe, attr, den, info, tmp)
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
    return out


def _schedule(pipe) -> dict | None:
    from qdiff.sched.qsched import get_schedule

    schedule = get_schedule(pipe)
    return None if schedule is None else schedule.to_dict()


def _write(pipe, attr: str, den, info, tmp: Path) -> None:
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
    pipe.save_config(tmp)  # model_index.json
    (tmp / attr).mkdir()
    den.save_config(tmp / attr)  # config.json of the float architecture
    save_file(_state_dict_for_file(den), str(tmp / attr / WEIGHTS_FILE), metadata={"format": "pt", "qdiff": "1"})
    layers = quantized_layers(den)
    first_float = next((p for p in den.parameters() if p.is_floating_point()), None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qdiff_version": qdiff.__version__,
        "base_model": info.base_model,
        "pipeline_class": type(pipe).__name__,
        "torch_dtype": str(first_float.dtype).removeprefix("torch.") if first_float is not None else "float32",
        "denoiser": {
            "attr": attr,
            "class": type(den).__name__,
            "family": get_adapter(den).family,
            "weights": f"{attr}/{WEIGHTS_FILE}",
        },
        "recipe": info.recipe.to_dict(),
        "plan": None if info.plan is None else info.plan.to_dict(),
        "layers": {
            name: {
                "weight_shape": list(m.weight_shape),
                "quant": m.qcfg.to_dict(),
                **({"bos": m.bos_mode} if hasattr(m, "bos_mode") else {}),  # BOS-aware K/V (optional field)
            }
            for name, m in layers.items()
        },
        **({"text_encoders": text_encoders} if text_encoders else {}),  # optional field
        "schedule": _schedule(pipe),  # Q-Sched coefficients (also in scheduler/qsched.json), or None
        "files": hash_tree(tmp),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
