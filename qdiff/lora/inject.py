"""Runtime LoRAs on qdiff-quantized models through diffusers' own API: the narrow hook that lets PEFT wrap them.

diffusers' ``load_lora_adapter`` (what ``pipe.load_lora_weights`` calls for the denoiser) builds its ``LoraConfig``
inside the call and passes it to ``peft.inject_adapter_in_model``, imported at call time; transformers'
``load_adapter`` (the text encoders) does the same with the config diffusers hands it. PEFT accepts custom layer
types through ``LoraConfig._register_custom_module`` (its extension point for layers it does not know). So every
model qdiff quantizes carries instance methods (:func:`attach_lora_hooks`, attached beside ``save_pretrained`` by
:mod:`qdiff.export.pretrained`) that run the class's own ``load_lora_adapter`` / ``load_adapter`` / ``add_adapter``
inside :func:`quant_lora_injection`: for the duration of that one call ``peft.inject_adapter_in_model`` registers
:func:`qdiff.lora.layers.lora_classes` on the config of an injection into *that* model, then calls PEFT. Nothing
is patched outside those calls (not thread-safe against another thread loading a LoRA at the same moment).

One PEFT detail is corrected after injection: with ``low_cpu_mem_usage=False`` PEFT moves a new LoRA layer's
weights to ``target.qweight.device``, which is ``meta`` once the cpu_int8 backend holds the codes in its prepacked
copy; such weights are re-created on the layer's real device (then loaded from the state dict as usual).

``fuse_lora`` on a quantized denoiser is refused up front (one line saying how to fuse before quantizing), before
diffusers scales a single layer. Nothing here imports PEFT until a LoRA is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from qdiff.errors import QdiffError

_HOOKED = ("load_lora_adapter", "load_adapter", "add_adapter")  # diffusers' / transformers' injection entry points


def attach_lora_hooks(module: nn.Module) -> None:
    """Give a quantized denoiser or text encoder the LoRA entry points that wrap its quantized layers (idempotent)."""
    for name in _HOOKED:
        method = getattr(type(module), name, None)
        if callable(method):
            setattr(module, name, types.MethodType(_hooked(method), module))
    if callable(getattr(type(module), "fuse_lora", None)):
        module.fuse_lora = types.MethodType(_fuse_lora, module)


def _hooked(method):
    @functools.wraps(method)
    def call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with quant_lora_injection(self):
            out = method(self, *args, **kwargs)
        own_storage(self)
        return out

    return call


@torch.no_grad()
def own_storage(model: nn.Module) -> None:
    """Give every LoRA factor of ``model`` its own 64-byte aligned storage.

    ``load_lora_weights`` assigns the tensors it read (views into the file's buffer, at whatever offset the file put
    them), and the CPU GEMMs' rounding depends on the operands' alignment: the same adapter loaded from two files could
    draw images that differ in the last bit. PyTorch's allocator aligns to 64 bytes, so after this copy an adapter
    computes the same bits whichever file it came from (a reloaded export with its saved adapters included)."""
    for module in model.modules():
        for name in ("lora_A", "lora_B"):
            factors = getattr(module, name, None)
            if not isinstance(factors, nn.ModuleDict):
                continue
            for factor in factors.values():
                for p in factor.parameters(recurse=False):
                    if not p.is_meta and p.data_ptr() % 64:
                        p.data = p.data.clone()


def _fuse_lora(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The denoiser's ``fuse_lora``: refused while a LoRA sits on a quantized layer, diffusers' own otherwise."""
    from qdiff.lora.layers import FUSE_REFUSED

    if any(_is_quant_lora(m) for m in module.modules()):
        raise QdiffError(FUSE_REFUSED)
    return type(module).fuse_lora(module, *args, **kwargs)


def _is_quant_lora(module: nn.Module) -> bool:
    return type(module).__name__ in ("QuantLoraLinear", "QuantLoraConv2d")


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's float parts compute in: its first floating parameter (a quantized layer keeps only
    integer codes and fp32 scales as buffers, so parameters are float weights, biases and norms)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def quant_lora_injection(model: nn.Module, mapping: dict[type, Any] | None = None) -> Iterator[None]:
    """While active, PEFT injections into ``model`` wrap its quantized layers with qdiff's LoRA layers (or the layer
    types of ``mapping`` with the given LoRA classes: the streaming probe, :mod:`qdiff.lora.stream`)."""
    import peft

    original = peft.inject_adapter_in_model
    if mapping is None:
        from qdiff.lora.layers import lora_classes

        dtype = float_dtype(model)
        mapping = {key: functools.partial(cls, compute_dtype=dtype) for key, cls in lora_classes().items()}

    def inject(peft_config, target: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
               **kwargs: Any) -> nn.Module:  # fmt: skip
        if target is model and isinstance(peft_config, peft.LoraConfig):
            peft_config._register_custom_module(mapping)
        out = original(peft_config, target, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        if target is model and not low_cpu_mem_usage:
            _materialize(model, adapter_name, peft_config.init_lora_weights)
        return out

    peft.inject_adapter_in_model = inject
    try:
        yield
    finally:
        peft.inject_adapter_in_model = original


@torch.no_grad()
def _materialize(model: nn.Module, adapter_name: str, init: Any) -> None:
    """Re-create LoRA weights that PEFT moved to ``meta`` (see the module docstring) on the layer's device."""
    from qdiff.lora.layers import layer_device

    for module in model.modules():
        if not _is_quant_lora(module) or adapter_name not in module.lora_A:
            continue
        parts = (module.lora_A[adapter_name], module.lora_B[adapter_name])
        if not any(p.is_meta for part in parts for p in part.parameters()):
            continue
        for part in parts:
            part.to_empty(device=layer_device(module.get_base_layer())).to(module.compute_dtype)
        module.reset_lora_parameters(adapter_name, init if init else True)
