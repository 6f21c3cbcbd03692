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
    a_split: int | None = None  # Conv2d on a concatenation: input channel where the skip part starts


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

    def act_splits(self, denoiser: nn.Module) -> dict[str, int]:
        """Layers whose input is a channel concatenation of two differently ranged tensors: name -> split."""
        return {}

    # --- derived --------------------------------------------------------------------------------------
    def layers(self, denoiser: nn.Module) -> list[LayerInfo]:
        infos = []
        splits = self.act_splits(denoiser)
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
                    a_split=splits.get(name),
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

    def act_splits(self, denoiser: nn.Module) -> dict[str, int]:
        """``up_blocks.{i}.resnets.{j}.conv1`` / ``.conv_shortcut`` -> up-path channels of ``cat([up, skip])``.

        Derived from the config as UNet2DConditionModel builds its up blocks: block ``i`` has
        ``prev_output_channel`` (the previous block's output), ``output_channel`` and ``input_channel`` (the
        next-shallower width); resnet ``j`` of ``n`` takes ``prev_output_channel`` (j = 0) or ``output_channel``
        from the up path and a skip of ``input_channel`` (j = n - 1) or ``output_channel`` channels. A layer whose
        ``in_channels`` disagrees with that sum is left unsplit.
        """
        cfg = denoiser.config
        widths = list(cfg.block_out_channels)[::-1]
        per_block = cfg.layers_per_block
        per_block = [per_block] * len(widths) if isinstance(per_block, int) else list(per_block)[::-1]
        out: dict[str, int] = {}
        output_channel = widths[0]
        for i, block_type in enumerate(cfg.up_block_types):
            prev_output_channel, output_channel = output_channel, widths[i]
            input_channel = widths[min(i + 1, len(widths) - 1)]
            if block_type.removeprefix("UNetRes") not in _CONCAT_UP_BLOCKS:
                continue
            n = per_block[i] + 1
            for j in range(n):
                up = prev_output_channel if j == 0 else output_channel
                skip = input_channel if j == n - 1 else output_channel
                for leaf in ("conv1", "conv_shortcut"):
                    name = f"up_blocks.{i}.resnets.{j}.{leaf}"
                    mod = _submodule(denoiser, name)
                    if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.in_channels == up + skip:
                        out[name] = up
        return out


# Up-block types whose resnets see cat([hidden_states, res_hidden_states]) (diffusers unet_2d_blocks.py).
_CONCAT_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D",
                     "SimpleCrossAttnUpBlock2D")  # fmt: skip


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


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
