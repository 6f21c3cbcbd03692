"""QuantLinear / QuantConv2d: fake vs frozen agreement, float64 references, measured bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdiff.calib.metrics import sqnr_db
from qdiff.config.layer import LayerQuant
from qdiff.numerics.primitives import compute_qparams, qrange
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


@pytest.mark.parametrize("qcfg", CONFIGS, ids=lambda q: f"{q.tag()}-{q.granularity}-{q.a_mode}-{q.method}")
@pytest.mark.parametrize("layer", [nn.Linear(50, 7), nn.Conv2d(5, 6, 3)], ids=["linear", "conv"])
def test_shells_match_frozen_shapes(layer, qcfg):
    """An empty load shell has exactly the frozen layer's state: same keys, then same shapes and dtypes."""
    real = quant_module_for(layer, qcfg)
    if qcfg.static_act:
        real.set_act_qparams(torch.tensor(0.1), torch.tensor(3))
    real.freeze()
    args = (50, 7, True, qcfg) if isinstance(layer, nn.Linear) else (QuantConv2d.conv_args(layer), True, qcfg)
    shell = type(real)(*args, device="meta")
    shell.make_frozen_shell("meta")
    real_state, shell_state = real.state_dict(), shell.state_dict()
    assert real_state.keys() == shell_state.keys()
    for key, value in real_state.items():
        assert (value.shape, value.dtype) == (shell_state[key].shape, shell_state[key].dtype), key


@pytest.mark.parametrize("qcfg", [LayerQuant(w_bits=4, a_bits=8), LayerQuant(w_bits=8, a_bits=8, a_mode="static")])
def test_gradient_is_straight_through_in_fake_state(gen, qcfg):
    """Fake state is differentiable with straight-through gradients (primitives' ``_StraightThrough``: identity,
    clipped elements included): the gradients are those of the float layer evaluated at the fake-quantized
    weight and input, whose own gradients pass to the float weight and input unchanged."""
    torch.manual_seed(0)
    m = QuantLinear.from_float(nn.Linear(8, 3), qcfg)
    x = torch.randn(2, 8, generator=gen) * 3
    if qcfg.static_act:  # a narrow range: many inputs are clipped, and their gradient still passes
        m.set_act_qparams(*compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), 8, symmetric=False))
    upstream = torch.randn(2, 3, generator=gen)
    xg = x.clone().requires_grad_(True)
    (m(xg) * upstream).sum().backward()
    # float reference: the same linear at the fake-quantized (leaf) weight and input
    wq = m.fake_weight().detach().requires_grad_(True)
    xq = m.fake_act(x).detach().requires_grad_(True)
    bias = m.bias.detach().clone().requires_grad_(True)
    (nn.functional.linear(xq, wq, bias) * upstream).sum().backward()
    assert torch.equal(xg.grad, xq.grad)
    assert torch.equal(m.weight.grad, wq.grad)
    assert torch.equal(m.bias.grad, bias.grad)
    assert torch.allclose(xg.grad.double(), upstream.double() @ wq.detach().double(), atol=1e-6)


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("update", ["data_mul", "data_copy", "no_grad_mul", "param_swap"])
def test_fake_weight_follows_in_place_updates(gen, method, update):
    """Issue #18: the weight scale was cached per device only, so an updated weight kept the old scale."""
    layer = nn.Linear(64, 16)
    m = quant_module_for(layer, LayerQuant(w_bits=4, a_bits=8, method=method))
    before = m.fake_weight().detach().clone()
    new = torch.randn(16, 64, generator=gen) * 8.0
    if update == "data_mul":
        m.weight.data.mul_(8.0)  # bypasses autograd's version counter
    elif update == "data_copy":
        m.weight.data.copy_(new)
    elif update == "no_grad_mul":
        with torch.no_grad():
            m.weight.mul_(8.0)
    else:
        m.weight = nn.Parameter(new.clone())
    fresh = quant_module_for(nn.Linear(64, 16), m.qcfg)
    fresh.weight = nn.Parameter(m.weight.detach().clone())
    after = m.fake_weight().detach()
    assert torch.equal(after, fresh.fake_weight().detach())
    assert not torch.equal(after, before)
    err = float((after - m.weight.detach()).abs().max() / m.weight.detach().abs().max())
    assert err < 0.25  # with the stale scale, values clip to the old range: error ~0.9 after the 8x update


def test_mse_weight_scale_is_cached_until_the_weight_changes(gen, monkeypatch):
    import qdiff.quant.modules as modules

    m = quant_module_for(nn.Linear(32, 8), LayerQuant(w_bits=4, a_bits=8, method="mse"))
    calls = []
    real = modules.mse_weight_scale
    monkeypatch.setattr(modules, "mse_weight_scale", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        m.fake_weight()
    assert len(calls) == 1
    with torch.no_grad():
        m.weight[0, 0] = 0.0  # in place, same storage: the version counter moves
    m.fake_weight()
    assert len(calls) == 2
