"""QuantLinear / QuantConv2d: fake vs frozen agreement, float64 references, measured bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdiff.calib.metrics import sqnr_db
from qdiff.config.layer import LayerQuant
from qdiff.numerics.primitives import qrange
from qdiff.quant.modules import QuantConv2d, QuantLinear, quant_module_for

CONFIGS = [
    LayerQuant(w_bits=8, a_bits=8),
    LayerQuant(w_bits=4, granularity="group", group_size=32, a_bits=8),
    LayerQuant(w_bits=4, a_bits=8, method="mse"),
    LayerQuant(w_bits=2, a_bits=8),
    LayerQuant(w_bits=3, granularity="tensor", a_bits=4),
    LayerQuant(w_bits=8, a_bits=None),
    LayerQuant(w_bits=8, a_bits=8, a_mode="static"),
    LayerQuant(w_bits=4, granularity="group", group_size=64, a_bits=8, a_mode="static"),
]


def _static_range(m, x):
    from qdiff.quant.observers import MinMaxObserver

    obs = MinMaxObserver()
    obs.update(x)
    m.set_act_qparams(*obs.qparams(m.qcfg.a_bits, symmetric=False))


def _pair(layer, qcfg, x):
    """(fake output, frozen output) of the same layer on the same input."""
    m = quant_module_for(layer, qcfg)
    if qcfg.static_act:
        _static_range(m, x)
    with torch.no_grad():
        fake = m(x)
        m.freeze()
        frozen = m(x)
    return m, fake, frozen


@pytest.mark.parametrize("qcfg", CONFIGS, ids=lambda q: f"{q.tag()}-{q.granularity}-{q.a_mode}-{q.method}")
def test_linear_fake_and_frozen_agree(qcfg, device, gen):
    layer = nn.Linear(96, 40, bias=True).to(device)  # K=96: a ragged last group for g=64
    x = torch.randn(3, 7, 96, generator=gen).to(device)
    m, fake, frozen = _pair(layer, qcfg, x)
    assert m.weight is None and m.state == "frozen"
    assert frozen.shape == (3, 7, 40)
    assert torch.allclose(fake, frozen, rtol=1e-5, atol=1e-5), (fake - frozen).abs().max()


@pytest.mark.parametrize("qcfg", CONFIGS, ids=lambda q: f"{q.tag()}-{q.granularity}-{q.a_mode}-{q.method}")
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_fake_and_frozen_agree(qcfg, stride, padding, device, gen):
    layer = nn.Conv2d(8, 12, 3, stride=stride, padding=padding).to(device)  # K = 72
    x = torch.randn(2, 8, 9, 9, generator=gen).to(device)
    m, fake, frozen = _pair(layer, qcfg, x)
    assert frozen.shape == fake.shape
    assert torch.allclose(fake, frozen, rtol=1e-5, atol=1e-5), (fake - frozen).abs().max()


def test_frozen_linear_matches_float64_reference(gen):
    """W8A8 per-channel, dynamic per-token: integer math written out in float64 here."""
    layer = nn.Linear(64, 16)
    x = torch.randn(5, 64, generator=gen)
    m = quant_module_for(layer, LayerQuant(w_bits=8, a_bits=8))
    w = layer.weight.detach().double()
    m.freeze()
    s_w = w.abs().amax(1, keepdim=True) / 127
    q_w = torch.clamp(torch.round(w / s_w.float().double()), -127, 127)
    xd = x.double()
    s_x = (xd.abs().amax(1, keepdim=True) / 127).float().double()
    q_x = torch.clamp(torch.round((x / s_x.float()).double()), -127, 127)
    ref = (q_x @ q_w.t()) * s_x * s_w.float().double().t() + layer.bias.detach().double()
    out = m(x).double()
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert sqnr_db(xd @ w.t() + layer.bias.detach().double(), out) > 30


def test_static_asymmetric_padding_is_exact_zero(gen):
    """Conv padding must be a real 0, not the zero-point code: shifted inputs expose a wrong pad."""
    layer = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.rand(1, 4, 6, 6, generator=gen) * 3 + 2  # strictly positive: zero-point far from code 0
    m, fake, frozen = _pair(layer, LayerQuant(w_bits=8, a_bits=8, a_mode="static"), x)
    ref = layer(x)
    assert torch.allclose(fake, frozen, rtol=1e-5, atol=1e-5)
    assert sqnr_db(ref.double(), frozen.double()) > 25


@pytest.mark.parametrize("bits,limit", [(4, 0.13), (8, 0.26)])
def test_frozen_bytes_measured(bits, limit):
    """A 1280x1280 Linear: bytes summed over real buffers = packed weight + fp32 scales + bias."""
    layer = nn.Linear(1280, 1280)
    fp_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    m = quant_module_for(layer, LayerQuant(w_bits=bits, a_bits=8))
    m.freeze()
    packed = m.qweight.numel() * m.qweight.element_size()
    assert packed == 1280 * 1280 * bits // 8
    assert m.qweight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    expected = packed + 1280 * 4 + 1280 * 4  # scales (fp32) + bias (fp32)
    assert m.nbytes() == expected
    assert m.nbytes() / fp_bytes <= limit


def test_frozen_state_dict_has_no_float_weight():
    m = quant_module_for(nn.Linear(32, 8), LayerQuant(w_bits=4, a_bits=8))
    m.freeze()
    keys = set(m.state_dict())
    assert keys == {"qweight", "w_scale", "bias"}


def test_static_requires_calibration_before_freeze():
    m = quant_module_for(nn.Linear(16, 4), LayerQuant(w_bits=8, a_bits=8, a_mode="static"))
    with pytest.raises(RuntimeError, match="calibrat"):
        m.freeze()


def test_observer_mode_runs_float_and_records(gen):
    from qdiff.quant.observers import MinMaxObserver

    layer = nn.Linear(16, 4)
    x = torch.randn(4, 16, generator=gen)
    m = quant_module_for(layer, LayerQuant(w_bits=2, a_bits=4))
    m.observer = MinMaxObserver()
    assert torch.equal(m(x), layer(x))  # float path while observing
    lo, hi = m.observer.range()
    assert float(lo) == float(x.min()) and float(hi) == float(x.max())


def test_quantized_activation_levels(gen):
    """Dynamic per-token A4: each token's fake-quantized input takes at most 15 distinct values."""
    m = quant_module_for(nn.Linear(64, 4), LayerQuant(w_bits=8, a_bits=4))
    xq = m.fake_act(torch.randn(6, 64, generator=gen))
    lo, hi = qrange(4, True)
    for row in xq:
        assert row.unique().numel() <= hi - lo + 1


def test_shells_match_frozen_shapes():
    for layer in (nn.Linear(50, 7), nn.Conv2d(5, 6, 3)):
        for q in CONFIGS:
            if q.static_act:
                continue
            real = quant_module_for(layer, q)
            real.freeze()
            shell = type(real)(
                *((50, 7, True, q) if isinstance(layer, nn.Linear) else (QuantConv2d.conv_args(layer), True, q)),
                device="meta",
            )
            shell.make_frozen_shell("meta")
            for (k1, v1), (k2, v2) in zip(sorted(real.state_dict().items()), sorted(shell.state_dict().items())):
                assert k1 == k2 and v1.shape == v2.shape and v1.dtype == v2.dtype, (q, k1)


def test_gradient_flows_in_fake_state(gen):
    """Fake state is differentiable (straight-through): needed by later learned calibration."""
    m = QuantLinear.from_float(nn.Linear(8, 3), LayerQuant(w_bits=4, a_bits=8))
    x = torch.randn(2, 8, generator=gen, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.weight.grad is not None and torch.isfinite(x.grad).all()
