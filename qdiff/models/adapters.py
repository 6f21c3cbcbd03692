"""Architecture adapters: which layers of a denoiser are quantizable, and how they are grouped.

A denoiser is the network a diffusion pipeline calls at every step (``pipe.unet`` or
``pipe.transformer``). An :class:`Adapter` lists its ``nn.Linear`` / ``nn.Conv2d`` layers in module
order as :class:`LayerInfo` records and assigns each one to a group:

* ``"content"`` — layers that mix in the text condition or carry most of the semantic content
  (cross-attention and feed-forward layers; MixDQ's "content-related" layers);
* ``"quality"`` — everything else (convolutions, self-attention, projections, embeddings).

``protected`` marks layers that are kept in full precision by default (the first and last layers).

Adding a family: subclass :class:`Adapter`, set ``family``, ``denoiser_attr`` and ``class_names``,
override :meth:`Adapter.group_of` / :meth:`Adapter.is_protected` / :meth:`Adapter.is_cross_attention_kv`,
and append an instance to ``ADAPTERS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qdiff.errors import QdiffError

CONTENT = "content"
QUALITY = "quality"


@dataclass(frozen=True)
class LayerInfo:
    name: str  # qualified module name inside the denoiser
    kind: str  # "linear" | "conv2d"
    group: str  # "content" | "quality"
    protected: bool  # kept in full precision by default
    in_features: int  # K: Linear in_features; Conv2d in_channels * kh * kw / groups
    out_features: int  # N
    weight_numel: int


def _parts(name: str) -> list[str]:
    return name.split(".")


def quantizable_modules(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every ``nn.Linear`` / ungrouped ``nn.Conv2d`` (subclasses included) as ``(name, module, kind)``.

    Modules are visited in ``named_modules`` order (registration order). Grouped / depthwise convolutions
    are skipped: they are not a plain GEMM.
    """
    found = []
    for name, mod in module.named_modules():
        if not name:
            continue
        if isinstance(mod, nn.Linear):
            found.append((name, mod, "linear"))
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
            found.append((name, mod, "conv2d"))
    return found


def _shape(mod: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "linear":
        return int(mod.in_features), int(mod.out_features)
    kh, kw = mod.kernel_size
    return int(mod.in_channels * kh * kw // mod.groups), int(mod.out_channels)


class Adapter:
    """Base adapter. Subclasses only declare the family's naming rules."""

    family: str = ""
    denoiser_attr: str = ""
    class_names: tuple[str, ...] = ()  # class names (anywhere in the MRO) this adapter handles

    def matches(self, denoiser: nn.Module) -> bool:
        return any(cls.__name__ in self.class_names for cls in type(denoiser).__mro__)

    # --- naming rules (override per family) ---------------------------------------------------------
    def group_of(self, name: str) -> str:
        return QUALITY

    def is_protected(self, name: str) -> bool:
        return False

    def is_cross_attention_kv(self, name: str) -> bool:
        return False

    # --- derived --------------------------------------------------------------------------------------
    def layers(self, denoiser: nn.Module) -> list[LayerInfo]:
        infos = []
        for name, mod, kind in quantizable_modules(denoiser):
            k, n = _shape(mod, kind)
            infos.append(
                LayerInfo(
                    name=name,
                    kind=kind,
                    group=self.group_of(name),
                    protected=self.is_protected(name),
                    in_features=k,
                    out_features=n,
                    weight_numel=int(mod.weight.numel()),
                )
            )
        return infos

    def cross_attention_kv(self, denoiser: nn.Module) -> list[str]:
        return [name for name, _, _ in quantizable_modules(denoiser) if self.is_cross_attention_kv(name)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"


class UNetAdapter(Adapter):
    """UNet2DConditionModel (SD 1.x / 2.x / SDXL / SD-Turbo / LCM UNets)."""

    family = "unet"
    denoiser_attr = "unet"
    class_names = ("UNet2DConditionModel",)

    def group_of(self, name: str) -> str:
        parts = _parts(name)
        return CONTENT if ("attn2" in parts or "ff" in parts) else QUALITY

    def is_protected(self, name: str) -> bool:
        return name in ("conv_in", "conv_out")

    def is_cross_attention_kv(self, name: str) -> bool:
        parts = _parts(name)
        return len(parts) >= 2 and parts[-2] == "attn2" and parts[-1] in ("to_k", "to_v")


class PixArtAdapter(Adapter):
    """PixArtTransformer2DModel (PixArt-alpha / PixArt-sigma DiTs)."""

    family = "pixart"
    denoiser_attr = "transformer"
    class_names = ("PixArtTransformer2DModel",)

    def group_of(self, name: str) -> str:
        parts = _parts(name)
        if parts[0] == "transformer_blocks" and ("attn2" in parts or "ff" in parts):
            return CONTENT
        return QUALITY

    def is_protected(self, name: str) -> bool:
        return name in ("pos_embed.proj", "proj_out")

    def is_cross_attention_kv(self, name: str) -> bool:
        parts = _parts(name)
        return parts[0] == "transformer_blocks" and parts[-2] == "attn2" and parts[-1] in ("to_k", "to_v")


class FluxAdapter(Adapter):
    """FluxTransformer2DModel (FLUX.1 schnell/dev): joint (MM-DiT) attention, so there is no separate
    cross-attention; the text stream enters attention through ``add_k_proj`` / ``add_v_proj``."""

    family = "flux"
    denoiser_attr = "transformer"
    class_names = ("FluxTransformer2DModel",)

    def group_of(self, name: str) -> str:
        parts = _parts(name)
        if "ff" in parts or "ff_context" in parts or "attn" in parts:
            return CONTENT
        # A single-stream block fuses its MLP (proj_mlp) and the attention + MLP output (proj_out).
        if parts[0] == "single_transformer_blocks" and parts[-1] in ("proj_mlp", "proj_out"):
            return CONTENT
        return QUALITY

    def is_protected(self, name: str) -> bool:
        return name in ("x_embedder", "context_embedder", "proj_out")

    def is_cross_attention_kv(self, name: str) -> bool:
        parts = _parts(name)
        return len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("add_k_proj", "add_v_proj")


class SD3Adapter(Adapter):
    """SD3Transformer2DModel (SD3 / SD3.5 MM-DiT): joint attention over an image and a text stream.

    Content: the text stream's attention projections (``add_q_proj``/``add_k_proj``/``add_v_proj`` and its output
    ``to_add_out``) and the feed-forwards ``ff``/``ff_context``; the image stream's ``to_q/k/v``/``to_out`` and the
    SD3.5 image-only ``attn2`` are quality. The text-stream K/V (``add_k_proj``/``add_v_proj``) play the role of
    cross-attention K/V.
    """

    family = "sd3"
    denoiser_attr = "transformer"
    class_names = ("SD3Transformer2DModel",)

    def group_of(self, name: str) -> str:
        parts = _parts(name)
        if "ff" in parts or "ff_context" in parts:
            return CONTENT
        if len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("add_q_proj", "add_k_proj", "add_v_proj",
                                                                     "to_add_out"):  # fmt: skip
            return CONTENT
        return QUALITY

    def is_protected(self, name: str) -> bool:
        return name in ("pos_embed.proj", "context_embedder", "proj_out")

    def is_cross_attention_kv(self, name: str) -> bool:
        parts = _parts(name)
        return len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("add_k_proj", "add_v_proj")


ADAPTERS: tuple[Adapter, ...] = (UNetAdapter(), PixArtAdapter(), FluxAdapter(), SD3Adapter())

_DENOISER_ATTRS = ("unet", "transformer")


def supported_families() -> list[str]:
    return [f"{a.family} ({', '.join(a.class_names)})" for a in ADAPTERS]


def find_denoiser(pipe) -> tuple[str, nn.Module]:
    """``("unet", pipe.unet)`` or ``("transformer", pipe.transformer)``."""
    for attr in _DENOISER_ATTRS:
        mod = getattr(pipe, attr, None)
        if isinstance(mod, nn.Module):
            return attr, mod
    raise QdiffError(
        f"{type(pipe).__name__} has no denoiser: expected a `unet` or `transformer` module on the pipeline"
    )


def get_adapter(denoiser: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(denoiser):
            return adapter
    raise QdiffError(
        f"unsupported denoiser {type(denoiser).__name__}: supported families are {'; '.join(supported_families())}"
    )
