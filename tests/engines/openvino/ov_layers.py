"""Small frozen quantized layers (exact reference backend) for the OpenVINO engine tests.

A plain module, not a ``conftest.py``: the suite has no test packages, so a second ``conftest`` would replace the root
one in ``sys.modules`` and break every ``from conftest import ...`` collected after it.
"""

from __future__ import annotations

import torch
from torch import nn

from qdiff.config.layer import LayerQuant
from qdiff.quant.modules import quant_module_for


class Holder(nn.Module):
    """A module around one layer: what ``traced_layers`` and ``ov.convert_model`` take."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def frozen_layer(kind: str, w_bits: int, mode: str, group: int | None, split: int | None = None, seed: int = 0):
    """``-> (layer, input)``: a frozen QuantLinear (96 -> 40; K a multiple of 32, as OpenVINO's dynamic quantization
    needs) or QuantConv2d (24 -> 16, 3x3), static ranges set from the input, running on the exact torch reference."""
    torch.manual_seed(seed)
    float_layer = nn.Linear(96, 40) if kind == "linear" else nn.Conv2d(24, 16, 3, padding=1)
    spec = {"w_bits": w_bits, "a_bits": 8, "a_mode": mode, "granularity": "group" if group else "channel",
            "group_size": group, "a_split": split}  # fmt: skip
    layer = quant_module_for(float_layer, LayerQuant.from_dict(spec))
    x = torch.randn(3, 11, 96) * 2 + 0.3 if kind == "linear" else torch.randn(2, 24, 9, 9) + 0.3
    if mode == "static":
        lo, hi = float(x.min()), float(x.max())
        scale = torch.tensor((hi - lo) / 255)
        zp = torch.tensor(-128 - round(lo / float(scale)))
        layer.set_act_qparams((scale, scale * 1.5) if split else scale, (zp, zp) if split else zp)
    layer.freeze()
    layer.kernel = "torch"  # the exact reference backend
    return layer, x
