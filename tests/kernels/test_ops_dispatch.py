"""Frozen modules through the Triton backend (interpreter on CPU) vs the torch reference, bit for bit.

Every comparison first checks with the spy (:func:`qdiff.backends.registry.recording`) that the reference run
really ran on "torch" and the Triton run really ran on "triton": comparing the reference with itself cannot pass
for a Triton test (``test_dispatch_tests_fail_without_triton`` proves it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from qdiff.backends.registry import recording
from qdiff.backends.triton import TritonBackend
from qdiff.config.layer import LayerQuant
from qdiff.numerics.primitives import compute_qparams, unpack_weight
from qdiff.quant.modules import QuantLayer, QuantLinear, quant_module_for

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


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """'triton' on a CPU tensor runs the interpreter (conftest sets this already when there is no GPU)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


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


def _both(m: QuantLayer, x: torch.Tensor, dev: torch.device, expect: str = "triton"):
    """(torch reference, kernel 'triton') outputs on ``dev``; the spy must show which backend ran each."""
    m.to(dev)
    x = x.to(dev)
    op = "linear" if isinstance(m, QuantLinear) else "conv2d"
    with recording() as calls:
        m.kernel = "torch"
        ref = m(x)
        m.kernel = "triton"
        out = m(x)
    assert calls == [("torch", op), (expect, op)], calls
    return ref, out


@pytest.mark.parametrize("cfg_key", list(CONFIGS))
@pytest.mark.parametrize("layer_key", list(LAYERS))
def test_frozen_module_same_output_both_paths(kdev, gen, layer_key, cfg_key):
    m, x = _frozen(layer_key, cfg_key, gen)
    ref, out = _both(m, x, kdev)
    assert torch.equal(ref, out)


def test_dispatch_tests_fail_without_triton(kdev, gen, monkeypatch):
    """Meta-test: with the Triton backend disabled, a Triton-path test above fails (no torch-vs-torch pass)."""
    test_frozen_module_same_output_both_paths(kdev, gen, "conv3x3", "w8a8-static")  # passes as it is
    monkeypatch.setattr(TritonBackend, "supports", lambda *a: False)
    with pytest.raises(AssertionError, match=r"\('torch', 'conv2d'\), \('torch', 'conv2d'\)"):
        test_frozen_module_same_output_both_paths(kdev, gen, "conv3x3", "w8a8-static")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer_key", ["linear", "conv3x3"])
def test_frozen_module_half_precision(kdev, gen, dtype, layer_key):
    m, x = _frozen(layer_key, "w4a8-g64-mse" if layer_key == "linear" else "w8a8-static", gen)
    m.to(dtype)
    ref, out = _both(m, x.to(dtype), kdev)
    assert out.dtype == dtype and torch.equal(ref, out)


@pytest.mark.parametrize(
    "cfg", [LayerQuant(w_bits=2), LayerQuant(w_bits=4, a_bits=None), LayerQuant(granularity="group", group_size=24)]
)
def test_uncovered_layers_fall_back_to_reference(kdev, gen, cfg):
    """2-bit weights, weight-only layers and groups not a multiple of 16: kernel 'triton' runs the reference."""
    m = quant_module_for(nn.Linear(64, 16), cfg)
    m.freeze()
    ref, out = _both(m, torch.randn(4, 64, generator=gen), kdev, expect="torch")
    assert torch.equal(ref, out)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_uneven_same_padding_falls_back_to_reference(kdev, gen):
    m = quant_module_for(nn.Conv2d(4, 6, 2, padding="same"), LayerQuant())
    m.freeze()
    ref, out = _both(m, torch.randn(1, 4, 5, 5, generator=gen), kdev, expect="torch")
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
    with torch.no_grad():  # new codes loaded in place: the sums follow them (not the old cache)
        state["qweight"] = torch.flip(state["qweight"], dims=[1]).contiguous()
        shell.load_state_dict(state)
    flipped = unpack_weight(shell.qweight.cpu(), 4, shell.in_features_2d).int()
    assert torch.equal(shell.w_sum.cpu()[:, 0], flipped[:, :32].sum(1))


def test_auto_runs_cpu_int8_or_reference_on_cpu_without_importing_triton():
    code = (
        "import sys, torch\n"
        "from qdiff.config.layer import LayerQuant\n"
        "from qdiff.quant.modules import quant_module_for\n"
        "from qdiff.backends.registry import recording\n"
        "m = quant_module_for(torch.nn.Linear(32, 8), LayerQuant()); m.freeze()\n"
        "from qdiff.backends.registry import REGISTRY\n"
        "want = 'cpu_int8' if REGISTRY.backend('cpu_int8')[0] is not None else 'torch'  # the exactness gate\n"
        "with recording() as calls: m(torch.randn(2, 32))\n"
        "assert calls == [(want, 'linear')], calls\n"
        "assert 'triton' not in sys.modules and 'qdiff._kernels' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


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
        with torch.no_grad(), recording() as calls:
            outs.append(unet(sample, 500, encoder_hidden_states=text).sample)
        assert {name for name, _ in calls} == {kernel}  # every quantized layer ran on the requested backend
        assert len(calls) >= len(layers)
    assert torch.equal(outs[0], outs[1])
