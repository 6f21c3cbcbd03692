"""Dispatch in qdiff.backends.ops and frozen modules through both paths (Triton interpreter vs torch reference)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from qdiff.backends import ops
from qdiff.config.layer import LayerQuant
from qdiff.errors import QdiffError
from qdiff.numerics.primitives import compute_qparams, unpack_weight
from qdiff.quant.modules import QuantLayer, quant_module_for


def test_resolve_backend_rules(monkeypatch):
    assert ops.resolve_backend("torch", "cuda") == "torch"
    assert ops.resolve_backend("auto", "cpu") == "torch"
    assert ops.resolve_backend("auto", "cuda") == "triton"  # decided from the device type; no GPU needed
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(QdiffError, match="Triton needs CUDA"):
        ops.resolve_backend("triton", "cpu")
    with pytest.raises(QdiffError, match="allowed values are auto, torch, triton"):
        ops.resolve_backend("cutlass", "cpu")
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert ops.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(QdiffError, match="not installed"):
        ops.resolve_backend("triton", "cuda")


def test_ops_import_is_lazy():
    code = "import sys, qdiff.backends.ops, qdiff.quant.modules; assert 'triton' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_weight_sums_brute_force(gen):
    from qdiff.numerics.primitives import pack_int4

    q = torch.randint(-8, 8, (5, 75), generator=gen, dtype=torch.int8)
    sums = ops.weight_sums(pack_int4(q), 4, 75, 32, 3)
    for n in range(5):
        for g in range(3):
            assert int(sums[n, g]) == sum(int(v) for v in q[n, g * 32 : (g + 1) * 32])
    assert torch.equal(ops.weight_sums(q, 8, 75, None, 1)[:, 0], q.int().sum(1))


CONFIGS = {
    "w8a8-dyn": LayerQuant(),
    "w4a8-g64-mse": LayerQuant(w_bits=4, granularity="group", group_size=64, method="mse"),
    "w8a8-static": LayerQuant(a_mode="static"),
    "w4a8-g32-static": LayerQuant(w_bits=4, granularity="group", group_size=32, a_mode="static"),
    "w3a8-channel": LayerQuant(w_bits=3),
    "w8a4-tensor": LayerQuant(granularity="tensor", a_bits=4),
}
LAYERS = {
    "linear": (lambda: nn.Linear(200, 70), (3, 11, 200)),
    "conv3x3": (lambda: nn.Conv2d(12, 20, 3, padding=1), (2, 12, 9, 11)),
    "conv1x1": (lambda: nn.Conv2d(24, 20, 1), (2, 24, 5, 7)),
    "conv-s2-dil": (lambda: nn.Conv2d(12, 20, 3, stride=2, padding=(1, 2), dilation=(1, 2)), (2, 12, 9, 11)),
    "conv-same": (lambda: nn.Conv2d(12, 20, 3, padding="same", bias=False), (1, 12, 6, 6)),
}


def _frozen(layer_key, cfg_key, gen):
    make, shape = LAYERS[layer_key]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer, cfg = make(), CONFIGS[cfg_key]
    x = torch.randn(shape, generator=gen) + 0.7  # shifted: the zero-point is far from 0
    m = quant_module_for(layer, cfg)
    if cfg.static_act:
        m.set_act_qparams(*compute_qparams(x.min(), x.max(), cfg.a_bits, symmetric=False))
    m.freeze()
    return m, x


def _both(m: QuantLayer, x: torch.Tensor, dev: torch.device):
    """(torch reference, Triton) outputs on ``dev`` (CPU: the Triton interpreter)."""
    m.to(dev)
    x = x.to(dev)
    m.kernel = "torch"
    ref = m(x)
    m.kernel = "triton"
    return ref, m(x)


@pytest.mark.parametrize("cfg_key", list(CONFIGS))
@pytest.mark.parametrize("layer_key", list(LAYERS))
def test_frozen_module_same_output_both_paths(kdev, gen, layer_key, cfg_key):
    m, x = _frozen(layer_key, cfg_key, gen)
    ref, out = _both(m, x, kdev)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer_key", ["linear", "conv3x3"])
def test_frozen_module_half_precision(kdev, gen, dtype, layer_key):
    m, x = _frozen(layer_key, "w4a8-g64-mse" if layer_key == "linear" else "w8a8-static", gen)
    m.to(dtype)
    ref, out = _both(m, x.to(dtype), kdev)
    assert out.dtype == dtype and torch.equal(ref, out)


def test_uncovered_layers_fall_back_to_reference(kdev, gen):
    """2-bit weights and weight-only layers have no kernel: 'triton' still runs them (torch path)."""
    for cfg in (LayerQuant(w_bits=2), LayerQuant(w_bits=4, a_bits=None)):
        m = quant_module_for(nn.Linear(64, 16), cfg)
        m.freeze()
        ref, out = _both(m, torch.randn(4, 64, generator=gen), kdev)
        assert torch.equal(ref, out)


def test_w_sum_buffer_follows_freeze_and_load(kdev, gen):
    m, x = _frozen("conv3x3", "w4a8-g32-static", gen)
    codes = unpack_weight(m.qweight, 4, m.in_features_2d).int()
    expected = torch.stack([codes[:, g * 32 : (g + 1) * 32].sum(1) for g in range(m.w_scale.shape[1])], 1)
    assert torch.equal(m.w_sum, expected)
    state = m.state_dict()
    assert "w_sum" not in state  # derived, never exported
    shell = quant_module_for(nn.Conv2d(12, 20, 3, padding=1), m.qcfg)
    shell.make_frozen_shell()
    shell.load_state_dict(state, assign=True)
    assert torch.equal(shell.w_sum, expected)
    ref, out = _both(shell, x, kdev)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_tiny_unet_step_same_through_both_paths(kdev, recipe):
    """A whole quantized denoiser call (attention projections, FF, ResNet 3x3/1x1 convs) on both backends."""
    import qdiff
    from qdiff.models.tiny import tiny_sd_pipeline
    from qdiff.quant.transform import quantized_layers

    pipe = qdiff.quantize(tiny_sd_pipeline(seed=0), recipe, progress=False)
    unet = pipe.unet.to(kdev)
    layers = quantized_layers(unet)
    assert any(m.weight_shape[-1] == 3 for m in layers.values())  # 3x3 convs are quantized, not skipped
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g).to(kdev)
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=g).to(kdev)
    outs = []
    for kernel in ("torch", "triton"):
        for m in layers.values():
            m.kernel = kernel
        with torch.no_grad():
            outs.append(unet(sample, 500, encoder_hidden_states=text).sample)
    assert torch.equal(outs[0], outs[1])
