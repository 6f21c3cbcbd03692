"""Swap a denoiser's Linear/Conv2d layers for quantized modules according to a recipe or a plan."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from qdiff.config.layer import LayerQuant
from qdiff.config.plan import Plan
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.models.adapters import LayerInfo
from qdiff.quant.modules import QuantConv2d, QuantLayer, QuantLinear, quant_module_for

_INFO_ATTR = "_qdiff_info"


@dataclass(frozen=True)
class QuantInfo:
    """What produced a quantized denoiser; kept on the module so that ``save`` can write the manifest."""

    recipe: Recipe
    plan: Plan | None = None
    base_model: str | None = None


def set_info(denoiser: nn.Module, info: QuantInfo) -> None:
    object.__setattr__(denoiser, _INFO_ATTR, info)  # plain attribute: not a submodule, not in state_dict


def get_info(denoiser: nn.Module) -> QuantInfo | None:
    return getattr(denoiser, _INFO_ATTR, None)


def layer_specs(layers: list[LayerInfo], recipe: Recipe, plan: Plan | None = None) -> dict[str, LayerQuant]:
    """Which layers to quantize and how. A plan sets bits per layer; the recipe supplies everything else.

    Without a plan every layer is quantized at the recipe's bits except protected layers (unless
    ``quantize_protected``) and names matching ``recipe.skip``. With a plan, exactly the layers the
    plan lists with ``w_bits`` are quantized; a name the denoiser does not have is an error.
    ``activations.split_skip`` with static activations: layers the adapter reports with an ``a_split`` (UNet
    up-block skip concatenations) get one activation quantizer per input part.
    """
    by_name = {info.name: info for info in layers}
    if plan is not None:
        unknown = sorted(set(plan.layers) - set(by_name))
        if unknown:
            raise QdiffError(f"plan names {len(unknown)} layer(s) the model does not have, e.g. {unknown[0]!r}")
    w, a = recipe.weights, recipe.activations
    specs: dict[str, LayerQuant] = {}
    for info in layers:
        if plan is not None:
            bits = plan.layers.get(info.name)
            if bits is None or bits.w_bits is None:
                continue
            w_bits, a_bits = bits.w_bits, bits.a_bits
        else:
            if info.protected and not recipe.quantize_protected:
                continue
            if any(fnmatch.fnmatchcase(info.name, pat) for pat in recipe.skip):
                continue
            w_bits, a_bits = w.bits, (None if a.bits == 16 else a.bits)
        # static (per-tensor) ranges only: dynamic ranges are per sample already, and split layers run the torch
        # path (no Triton kernel takes two activation scales), which would cost the GPU speed-up
        splittable = a.split_skip and a.mode == "static" and a_bits is not None and info.kind == "conv2d"
        split = info.a_split if splittable else None
        specs[info.name] = LayerQuant(
            w_bits=w_bits, granularity=w.granularity, group_size=w.group_size, method=w.method,
            a_bits=a_bits, a_mode=a.mode, a_split=split,
        )  # fmt: skip
    return specs


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def apply_specs(
    denoiser: nn.Module, specs: Mapping[str, LayerQuant], bos: Mapping[str, str] | None = None
) -> dict[str, QuantLayer]:
    """Replace each named layer by its quantized module in the *fake* state; returns name → module.

    ``bos`` maps cross-attention K/V layer names to a BOS mode (``qdiff.quant.bos``): those Linear layers
    become :class:`~qdiff.quant.bos.BOSQuantLinear`.
    """
    from qdiff.quant.bos import BOSQuantLinear

    bos = bos or {}
    out: dict[str, QuantLayer] = {}
    for name, qcfg in specs.items():
        parent, child = _parent(denoiser, name)
        layer = getattr(parent, child)
        if name in bos and isinstance(layer, nn.Linear):
            qmod = BOSQuantLinear.from_float(layer, qcfg)
            qmod.bos_mode = bos[name]
        else:
            qmod = quant_module_for(layer, qcfg)
        setattr(parent, child, qmod)
        out[name] = qmod
    return out


def build_frozen_shells(
    denoiser: nn.Module, specs: Mapping[str, LayerQuant], bos: Mapping[str, str] | None = None
) -> dict[str, QuantLayer]:
    """Replace named layers by empty *frozen* modules (meta buffers) for ``load_state_dict(assign=True)``.

    ``bos``: layer name -> BOS mode for BOS-aware cross-attention K/V layers (manifest field ``bos``).
    """
    from qdiff.quant.bos import BOSQuantLinear

    bos = bos or {}
    out: dict[str, QuantLayer] = {}
    for name, qcfg in specs.items():
        parent, child = _parent(denoiser, name)
        layer = getattr(parent, child)
        if isinstance(layer, nn.Linear):
            cls = BOSQuantLinear if name in bos else QuantLinear
            qmod = cls(layer.in_features, layer.out_features, layer.bias is not None, qcfg, device="meta")
            if name in bos:
                qmod.make_bos_shell(bos[name], "meta")
        elif isinstance(layer, nn.Conv2d):
            qmod = QuantConv2d(QuantConv2d.conv_args(layer), layer.bias is not None, qcfg, device="meta")
        else:
            raise QdiffError(f"layer {name!r} is a {type(layer).__name__}, not Linear/Conv2d")
        qmod.make_frozen_shell("meta")
        setattr(parent, child, qmod)
        out[name] = qmod
    return out


def quantized_layers(denoiser: nn.Module) -> dict[str, QuantLayer]:
    """All quantized modules of a denoiser, by qualified name."""
    return {name: m for name, m in denoiser.named_modules() if isinstance(m, QuantLayer)}
