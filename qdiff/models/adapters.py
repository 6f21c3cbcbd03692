"""Architecture adapters: which layers of a denoiser are quantizable, and how they are grouped.

A denoiser is the network a diffusion pipeline calls at every step (``pipe.unet`` or ``pipe.transformer``).
Its adapter is the :class:`~qdiff.models.registry.Architecture` the family registry declares for its class
(``qdiff/models/families.py``): it lists the ``nn.Linear`` / ``nn.Conv2d`` layers in module order as
:class:`LayerInfo` records, grouped ``"content"`` / ``"quality"``, with the float-kept (``protected``) layers,
the cross-attention K/V and the split points.

Adding a family: one entry in ``qdiff/models/families.py`` (docs/developer-guide.md); nothing here changes.
"""

from __future__ import annotations

from torch import nn

from qdiff.models.families import current_registry
from qdiff.models.layers import CONTENT, QUALITY, LayerInfo, quantizable_modules
from qdiff.models.registry import Architecture

Adapter = Architecture  # the adapter interface: layers(), cross_attention_kv(), act_splits(), family, ...

__all__ = [
    "CONTENT", "QUALITY", "Adapter", "LayerInfo", "find_denoiser", "get_adapter", "quantizable_modules",
    "supported_families",
]  # fmt: skip


def supported_families() -> list[str]:
    """``"unet (UNet2DConditionModel)"``, ... for every declared architecture."""
    return current_registry().supported_families()


def find_denoiser(pipe) -> tuple[str, nn.Module]:
    """``("unet", pipe.unet)`` or ``("transformer", pipe.transformer)``: the declared denoiser attributes."""
    return current_registry().find_denoiser(pipe)


def get_adapter(denoiser: nn.Module) -> Adapter:
    """The architecture declared for the denoiser's class (QdiffError naming the supported ones otherwise)."""
    return current_registry().architecture_for(denoiser)
