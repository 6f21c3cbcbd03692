"""LoRA deltas for the streaming quantizer: fused into each layer as it is read, never the whole model in memory.

The LoRA files are read by diffusers (``lora_state_dict`` of the pipeline class: diffusers / PEFT format and the
formats it converts) and loaded with diffusers' ``load_lora_adapter`` into a *probe*: the denoiser built on the
``meta`` device, whose Linear / Conv2d layers PEFT wraps with its own LoRA layers (``_ProbeLinear`` /
``_ProbeConv2d``: PEFT's classes, placed on the CPU instead of beside the absent base weight). So the targeted
layers, ranks, alphas (``network_alphas``, the file's adapter metadata) and the delta arithmetic are exactly those of
diffusers' ``fuse_lora`` on a loaded model, and :meth:`LayerDeltas.apply` adds ``scale * scaling * B @ A`` to a
weight read from the checkpoint in the dtype it is read in, as ``fuse_lora`` adds it to a model loaded in that
dtype: the streamed export equals the in-memory one byte for byte (``tests/lora``). Memory: the LoRA factors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from qdiff.config.loras import LoraFile
from qdiff.errors import QdiffError
from qdiff.lora.files import checked_path

# the pipeline class whose lora_state_dict reads a LoRA for a denoiser streamed without its pipeline folder
_LOADER_OF_DENOISER = {
    "UNet2DConditionModel": "StableDiffusionPipeline",
    "FluxTransformer2DModel": "FluxPipeline",
    "SD3Transformer2DModel": "StableDiffusion3Pipeline",
}


def loader_class(pipeline_folder: Path | None, den_cls: type, config: dict):
    """The diffusers pipeline class that reads LoRA files for this denoiser (its ``lora_state_dict``)."""
    import diffusers

    name = None
    if pipeline_folder is not None:
        name = json.loads((pipeline_folder / "model_index.json").read_text()).get("_class_name")
    if name is None:
        name = _LOADER_OF_DENOISER.get(den_cls.__name__)
        if name == "StableDiffusionPipeline" and config.get("addition_embed_type") == "text_time":
            name = "StableDiffusionXLPipeline"
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "lora_state_dict"):
        raise QdiffError(f"diffusers has no LoRA loader for {name or den_cls.__name__}; cannot fuse a LoRA into it")
    return cls


class LayerDeltas:
    """The fused LoRAs' weight (and bias) deltas of one denoiser, keyed by layer name."""

    def __init__(self, probe: nn.Module, adapters: list[tuple[str, float]]) -> None:
        from peft.tuners.lora import LoraLayer

        self.adapters = adapters  # (adapter name, scale), fused in this order
        self.layers: dict[str, LoraLayer] = {n: m for n, m in probe.named_modules() if isinstance(m, LoraLayer)}

    @classmethod
    def plan(cls, den_cls: type, config: dict, attr: str, pipeline: Path | None, loras: tuple[LoraFile, ...]):
        """Load every LoRA (its factors only) into a meta probe of ``den_cls(config)``; ``pipeline``: the pipeline
        folder (its class reads the LoRA files), None for a denoiser streamed alone."""
        from accelerate import init_empty_weights

        from qdiff.lora.inject import quant_lora_injection

        loader = loader_class(pipeline, den_cls, config)
        with init_empty_weights(include_buffers=False):
            probe = den_cls.from_config(config)
        adapters: list[tuple[str, float]] = []
        mapping = _probe_classes()
        for i, lora in enumerate(loras):
            path, name = checked_path(lora), f"fuse{i}"
            state, alphas, metadata = loader.lora_state_dict(str(path.parent), weight_name=path.name,
                                                             use_safetensors=True, local_files_only=True,
                                                             return_lora_metadata=True)  # fmt: skip
            parts = sorted({k.split(".", 1)[0] for k in state} - {attr})
            if parts:
                raise QdiffError(f"LoRA {lora.path} also changes {', '.join(parts)}: a streamed quantization fuses "
                                 "the denoiser only; quantize with --in-memory")  # fmt: skip
            with quant_lora_injection(probe, mapping):
                probe.load_lora_adapter(state, prefix=attr, network_alphas=alphas, metadata=metadata,
                                        adapter_name=name, low_cpu_mem_usage=True)  # fmt: skip
            if not any(name in m.lora_A for m in probe.modules() if hasattr(m, "lora_A")):
                raise QdiffError(f"LoRA {lora.path}: none of its keys names a layer of this {den_cls.__name__}")
            adapters.append((name, lora.scale))
        return cls(probe, adapters)

    @torch.no_grad()
    def apply(self, key: str, tensor: Tensor) -> Tensor:
        """``tensor`` (a weight or bias as read) plus every fused LoRA's delta, in its dtype and fuse order."""
        layer, _, leaf = key.rpartition(".")
        module = self.layers.get(layer)
        if module is None or leaf not in ("weight", "bias"):
            return tensor
        fused = [(n, s) for n, s in self.adapters if n in module.lora_A and (leaf == "weight" or module.lora_bias[n])]
        if not fused:
            return tensor
        out = tensor.clone()
        for name, scale in fused:
            module.lora_A[name].to(out.dtype)
            module.lora_B[name].to(out.dtype)
            scaling = module.scaling[name] * scale  # fuse_lora's scale_layer (a float: * 1.0 changes no bit)
            if leaf == "weight":
                saved, module.scaling[name] = module.scaling[name], scaling
                try:
                    out += module.get_delta_weight(name)  # PEFT's own delta, as its merge adds it
                finally:
                    module.scaling[name] = saved
            else:
                out += module.lora_B[name].bias * scaling
        return out


def _probe_classes() -> dict[type, type]:
    """PEFT's Linear / Conv2d LoRA layers placed on the CPU (their base layers are ``meta`` in the probe)."""
    from peft.tuners import lora

    class _ProbeLinear(lora.Linear):
        def _get_base_layer_device_and_dtype(self, base_layer):
            return torch.device("cpu"), None

    class _ProbeConv2d(lora.Conv2d):
        def _get_base_layer_device_and_dtype(self, base_layer):
            return torch.device("cpu"), None

    return {nn.Linear: _ProbeLinear, nn.Conv2d: _ProbeConv2d}
