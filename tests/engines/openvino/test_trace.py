"""The traced (OpenVINO-facing) form of each frozen layer computes what qdiff's exact reference computes.

Torch only: the ops under ``traced_layers`` are what ``ov.convert_model`` sees. Static activations and dynamic
per-sample convolutions are quantized exactly as qdiff does; dynamic Linear activations stay float in the trace (the
OpenVINO plugin quantizes them at run time), so those layers are compared with the weight-only product.
"""

from __future__ import annotations

import pytest
import torch
from ov_layers import Holder, frozen_layer
from torch import nn

from qdiff.config.layer import LayerQuant
from qdiff.engines.openvino.trace import TracedWeight, frozen_layers, traced_layers
from qdiff.quant.modules import quant_module_for

CASES = [
    ("linear", 8, "static", None, None), ("linear", 4, "static", 24, None), ("linear", 4, "static", None, None),
    ("conv", 8, "static", None, None), ("conv", 4, "static", None, None), ("conv", 8, "static", None, 10),
    ("conv", 8, "dynamic", None, None), ("conv", 4, "dynamic", 72, None), ("conv", 8, "dynamic", None, 10),
]  # fmt: skip


@pytest.mark.parametrize("kind,w_bits,mode,group,split", CASES)
def test_traced_layer_equals_the_reference(kind, w_bits, mode, group, split):
    layer, x = frozen_layer(kind, w_bits, mode, group, split)
    wrapped = Holder(layer)
    with torch.no_grad():
        ref = wrapped(x)
        with traced_layers(wrapped) as layers:
            assert list(layers) == ["layer"]
            traced = wrapped(x)
        again = wrapped(x)
    assert torch.equal(again, ref), "the layer is restored after the block"
    err = ((traced.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-6, err  # float32 accumulation order only (measured ~1e-7)


@pytest.mark.parametrize("w_bits,group", [(8, None), (4, 24), (4, None)])
def test_dynamic_linear_is_traced_weight_only(w_bits, group):
    """Per-token activations are left to the OpenVINO plugin: the trace is the decompressed weight's product."""
    layer, x = frozen_layer("linear", w_bits, "dynamic", group)
    wrapped = Holder(layer)
    w = layer.dequantized_weight().double()
    with torch.no_grad(), traced_layers(wrapped):
        traced = wrapped(x)
    ref = x.double() @ w.T + layer.bias.double()
    assert ((traced.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_decompressed_weight_handles_a_ragged_last_group():
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (5, 70), dtype=torch.int8)
    scale = torch.rand(5, 3) + 0.1  # groups of 32: 32 + 32 + 6
    w = TracedWeight(codes, scale, 32).decompressed()
    expected = codes.float() * scale.repeat_interleave(32, dim=1)[:, :70]  # one fp32 product per weight
    assert w.shape == (5, 70) and torch.equal(w, expected)


def test_bos_aware_layers_keep_their_full_precision_row():
    from qdiff.quant.bos import BOSQuantLinear

    torch.manual_seed(0)
    float_layer = nn.Linear(16, 8)
    spec = LayerQuant.from_dict({"w_bits": 8, "a_bits": 8, "a_mode": "static", "granularity": "channel"})
    layer = BOSQuantLinear.from_float(float_layer, spec)
    bos = torch.randn(16) * 50
    layer.set_bos("cached", bos)
    layer.set_act_qparams(torch.tensor(6.0 / 255), torch.tensor(0))
    layer.freeze()
    layer.kernel = "torch"
    x = torch.randn(2, 5, 16)
    x[:, 0] = bos
    wrapped = Holder(layer)
    with torch.no_grad():
        ref = wrapped(x)
        with traced_layers(wrapped):
            traced = wrapped(x)
    assert torch.equal(traced[:, 0], ref[:, 0])  # token 0: the cached full-precision row, untouched
    assert torch.allclose(traced, ref, rtol=0, atol=1e-5)


def test_frozen_layers_lists_only_frozen_quantized_layers():
    layer, _ = frozen_layer("linear", 8, "static", None)
    fake = quant_module_for(nn.Linear(4, 4), LayerQuant.from_dict({"w_bits": 8}))
    model = nn.ModuleDict({"a": layer, "b": fake, "c": nn.Linear(2, 2)})
    assert list(frozen_layers(model)) == ["a"]
