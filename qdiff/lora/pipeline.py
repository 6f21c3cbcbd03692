"""Pipeline-level LoRA shims for quantized pipelines: the one diffusers code path that reads a base weight directly.

FLUX's ``load_lora_weights`` (diffusers 0.42.1) first passes the LoRA through ``_maybe_expand_lora_state_dict``, which
zero-pads ``lora_A`` of layers whose input grew (Control LoRAs widen ``x_embedder``) and reads
``transformer.state_dict()[f"{layer}.weight"]`` for every targeted layer, a key a frozen qdiff layer does not have
(it holds ``qweight``). :func:`attach_pipeline_hooks` gives such a pipeline an instance
``_maybe_expand_lora_state_dict`` that leaves the entries of quantized layers as they are (after checking their input
width) and hands the rest (the float-kept layers, ``x_embedder`` among them) to diffusers' own. :func:`qdiff.quantize`
and :func:`qdiff.load` attach it; a FLUX pipeline from ``DiffusionPipeline.from_pretrained`` needs
``qdiff.lora.attach_pipeline_hooks(pipe)`` once.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from qdiff.errors import QdiffError


def attach_pipeline_hooks(pipe) -> None:
    """Give ``pipe`` the shims its class needs for LoRAs on quantized layers, and its text encoders the LoRA entry
    points of :mod:`qdiff.lora.inject` (float ones too: their adapters get aligned storage, as the denoiser's)."""
    from qdiff.lora.inject import attach_lora_hooks

    original = getattr(type(pipe), "_maybe_expand_lora_state_dict", None)
    if original is not None:
        pipe._maybe_expand_lora_state_dict = types.MethodType(_expanding(original), pipe)
    for name, component in pipe.components.items():
        if name.startswith("text_encoder") and isinstance(component, nn.Module):
            attach_lora_hooks(component)


def _expanding(original):
    def expand(pipe, transformer: nn.Module, lora_state_dict: dict[str, Any]) -> dict[str, Any]:
        from qdiff.quant.modules import QuantLayer

        prefix = f"{type(pipe).transformer_name}."
        quantized = {
            n.removesuffix(".base_layer"): m for n, m in transformer.named_modules() if isinstance(m, QuantLayer)
        }
        own: dict[str, Any] = {}
        for key, value in lora_state_dict.items():
            layer = key.removeprefix(prefix).rsplit(".lora_", 1)[0]
            if key.startswith(prefix) and layer in quantized:
                if key.endswith(".lora_A.weight") and value.shape[1] != quantized[layer].weight_shape[1]:
                    raise QdiffError(f"LoRA {key}: input width {value.shape[1]} does not match the quantized layer's "
                                     f"{quantized[layer].weight_shape[1]}")  # fmt: skip
                own[key] = value
        rest = original(transformer, {k: v for k, v in lora_state_dict.items() if k not in own})
        return {**rest, **own}

    return expand
