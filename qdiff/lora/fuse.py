"""Fuse LoRAs into a float pipeline before it is calibrated and quantized (recipe key ``loras``, ``--lora``).

The fuse is diffusers' own, on the float pipeline: for each LoRA in order, ``load_lora_weights`` (safetensors only),
``fuse_lora(lora_scale=scale)`` into every component it targets, ``unload_lora_weights``; so calibration, the
sensitivity search and the ILP all see the model that will run. The streaming quantizer applies the same deltas layer
by layer (:mod:`qdiff.lora.stream`), byte for byte the same weights. The denoiser remembers what was fused (sha256 and
scale), so a pipeline is never fused twice and the export manifest records it (the recipe's ``loras``).
"""

from __future__ import annotations

from torch import nn

from qdiff.config.loras import LoraFile, as_lora_files
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.lora.files import checked_path, resolve
from qdiff.models.adapters import find_denoiser
from qdiff.quant.transform import quantized_layers

_FUSED_ATTR = "_qdiff_fused_loras"
_FUSE_ADAPTER = "qdiff_fuse"


def fused_loras(den: nn.Module) -> tuple[LoraFile, ...]:
    """The LoRAs fused into this denoiser by :func:`fuse_loras` (with sha256), in order."""
    return getattr(den, _FUSED_ATTR, ())


def with_loras(recipe: Recipe, loras=None) -> Recipe:
    """``recipe`` with ``loras`` (``'PATH[:SCALE]'`` strings, pairs or LoraFiles; None: the recipe's own) checked and
    hashed; ``recipe`` itself when there is no LoRA at all."""
    if loras is None and not recipe.loras:
        return recipe
    chosen = recipe.loras if loras is None else as_lora_files(loras)
    return recipe.replace(loras=resolve(chosen))


def fuse_recipe_loras(pipe, recipe: Recipe) -> None:
    """Fuse ``recipe.loras`` (already resolved) into ``pipe`` unless exactly these are fused already."""
    if not recipe.loras:
        return
    _, den = find_denoiser(pipe)
    done = fused_loras(den)
    want = tuple(recipe.loras)
    if done == want:
        return
    if done:
        names = ", ".join(lora.label() for lora in done)
        raise QdiffError(f"this pipeline already has LoRAs fused ({names}); load the float model again to fuse others")
    fuse_loras(pipe, want)


def fuse_loras(pipe, loras: tuple[LoraFile, ...]) -> None:
    """Fuse each LoRA (in order, at its scale) into the float ``pipe`` in place, through diffusers."""
    if not loras:
        return
    _, den = find_denoiser(pipe)
    if quantized_layers(den):
        raise QdiffError("LoRAs are fused into the float pipeline before quantizing; this one is quantized already")
    if not callable(getattr(pipe, "load_lora_weights", None)):
        raise QdiffError(f"diffusers has no LoRA loader for {type(pipe).__name__}; cannot fuse a LoRA into it")
    from peft.tuners.tuners_utils import BaseTunerLayer

    for lora in loras:
        path = checked_path(lora)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, use_safetensors=True, local_files_only=True,
                               adapter_name=_FUSE_ADAPTER)  # fmt: skip
        try:
            wrapped = any(isinstance(m, BaseTunerLayer) for c in pipe.components.values()
                          if isinstance(c, nn.Module) for m in c.modules())  # fmt: skip
            if not wrapped:
                raise QdiffError(f"LoRA {lora.path}: none of its keys names a layer of this {type(pipe).__name__}")
            pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[_FUSE_ADAPTER])
        finally:
            pipe.unload_lora_weights()
    object.__setattr__(den, _FUSED_ATTR, tuple(loras))
