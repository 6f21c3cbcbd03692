"""CPU int8 kernels: bit-identical to the torch reference, and the exactness gate (passes here, fails without VNNI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from qdiff.backends import cpu_int8 as ci
from qdiff.backends import onednn, reference
from qdiff.backends.acts import ActSpec, ConvGeometry
from qdiff.numerics.packed import PackedWeight
from qdiff.numerics.primitives import compute_qparams, pack_weight


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


HAS_VNNI = bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
pytestmark = pytest.mark.skipif(not ci.onednn_available(), reason="this torch build has no oneDNN quantized ops")
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="no VNNI/AMX in /proc/cpuinfo flags: int8 kernels not exact")
KERNELS = ("onednn", "int_mm")


def _codes(n: int, k: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (n, k), generator=gen, dtype=torch.int8)
    q[0] = qmax  # a row of extreme codes
    return q


def _x(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * 2
    x.view(-1)[:: max(1, x.numel() // 7)] *= 10  # outliers: static codes clamp at both ends
    return x.to(dtype)


def _act(mode: str, x: torch.Tensor, bits: int = 8, split: int | None = None) -> ActSpec:
    """Dynamic, or static with a calibrated (narrow, shifted) range: nonzero zero-point, clamping at both ends."""
    if mode == "dynamic":
        return ActSpec(bits, "dynamic", split=split)
    xf = x.float()
    if split is None:
        scale, zp = compute_qparams(torch.tensor(-2.0), xf.amax() * 0.5, bits, symmetric=False)
        return ActSpec(bits, "static", scale, zp)
    lo, hi = torch.tensor([-2.0, -0.5]), torch.tensor([3.0, 1.0])
    scale, zp = compute_qparams(lo, hi, bits, symmetric=False)
    return ActSpec(bits, "static", scale, zp, split=split)


def _bias(n: int, with_bias: bool, gen: torch.Generator) -> torch.Tensor | None:
    return torch.randn(n, generator=gen) if with_bias else None


# ---- GEMM -----------------------------------------------------------------------------------------------------------
@needs_vnni
@pytest.mark.parametrize("m,k,n", [(1, 5, 7), (3, 8, 8), (33, 17, 9), (64, 256, 40)])
@pytest.mark.parametrize("adtype", [torch.int8, torch.uint8])
def test_int8_gemm_exact_on_ragged_shapes(m, k, n, adtype, gen):
    lo, hi = (-128, 128) if adtype == torch.int8 else (0, 256)
    qa = torch.randint(lo, hi, (m, k), generator=gen, dtype=adtype)
    qw = _codes(n, k, 8, gen)
    want = (qa.long() @ qw.long().t()).to(torch.int32)
    assert torch.equal(ci.int8_gemm(qa, qw.t()), want)  # transposed view
    assert torch.equal(ci.int8_gemm(qa, qw.t().contiguous()), want)


# ---- Linear ---------------------------------------------------------------------------------------------------------
@needs_vnni
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_w8a8_equals_reference(kernel, mode, dtype, with_bias, gen):
    k, n = 96, 40
    q = _codes(n, k, 8, gen)
    for scale in (torch.rand(n, 1, generator=gen) * 0.02 + 1e-3, torch.tensor([[0.01]])):
        pw = PackedWeight(pack_weight(q, 8), scale, 8, k)
        x = _x((2, 7, k), dtype, gen)
        act, bias = _act(mode, x), _bias(n, with_bias, gen)
        want = reference.linear(x, pw, act, bias)
        packed = ci.prepack_linear(q, scale, kernel=kernel)
        got = ci.linear_w8a8(x, q, scale, bias, a_mode=mode, a_scale=act.scale, a_zp=act.zp, packed=packed)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want)


@needs_vnni
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_linear_w8a8_large_k_and_4bit_activations(mode, gen):
    """K large enough that the reference accumulates in float64 (|sum| >= 2**24); 4-bit activations too."""
    k, n = 1100, 24
    q = _codes(n, k, 8, gen)
    scale = torch.rand(n, 1, generator=gen) + 0.5
    pw = PackedWeight(pack_weight(q, 8), scale, 8, k)
    x = _x((9, k), torch.float32, gen)
    for bits in (8, 4):
        act = _act(mode, x, bits)
        want = reference.linear(x, pw, act, None)
        got = ci.linear_w8a8(x, q, scale, a_bits=bits, a_mode=mode, a_scale=act.scale, a_zp=act.zp)
        assert torch.equal(got, want)


@needs_vnni
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_w4a8_groupwise_ragged_equals_reference(kernel, mode, dtype, gen):
    k, n, gs = 100, 24, 32  # groups of 32, 32, 32 and a ragged 4
    for bits in (4, 3):
        q = _codes(n, k, bits, gen)
        scale = torch.rand(n, 4, generator=gen) * torch.logspace(-3, 0, n).reshape(-1, 1)
        pw = PackedWeight(pack_weight(q, bits), scale, bits, k, gs)
        x = _x((5, k), dtype, gen)
        act, bias = _act(mode, x), _bias(n, True, gen)
        want = reference.linear(x, pw, act, bias)
        packed = ci.prepack_linear(q, scale, gs, kernel=kernel)
        assert len(packed.bounds) == 4 and packed.bounds[-1] == (96, 100)
        got = ci.linear_packed(x, packed, bias, a_mode=mode, a_scale=act.scale, a_zp=act.zp)
        assert torch.equal(got, want)
        # from the stored (packed nibble) form, prepacked by the call
        got = ci.linear_w4a8(
            x, pw.codes, scale, gs, bias, in_features=k, w_bits=bits, a_mode=mode, a_scale=act.scale, a_zp=act.zp
        )
        assert torch.equal(got, want)


@needs_vnni
@pytest.mark.parametrize("kernel", KERNELS)
def test_linear_w4a8_row_tiles_equal_reference(kernel, gen, monkeypatch):
    """Many rows: the group-wise accumulator is computed in row tiles (64 rows here, the last one ragged)."""
    monkeypatch.setattr(onednn, "_ACC_TILE_BYTES", 1)
    k, n, gs = 80, 16, 16
    q = _codes(n, k, 4, gen)
    scale = torch.rand(n, 5, generator=gen) * 0.1
    pw = PackedWeight(pack_weight(q, 4), scale, 4, k, gs)
    x = _x((150, k), torch.float32, gen)
    packed = ci.prepack_linear(q, scale, gs, kernel=kernel)
    assert torch.equal(ci.linear_packed(x, packed), reference.linear(x, pw, ActSpec(8, "dynamic"), None))


@needs_vnni
def test_empty_batch(gen):
    q, scale = _codes(16, 32, 8, gen), torch.rand(16, 1, generator=gen)
    pw = PackedWeight(pack_weight(q, 8), scale, 8, 32)
    x = torch.randn(2, 0, 32)
    assert torch.equal(ci.linear_w8a8(x, q, scale), reference.linear(x, pw, ActSpec(8, "dynamic"), None))


# ---- Conv2d ---------------------------------------------------------------------------------------------------------
CONV_CASES = [  # (C, N, kernel, stride, padding, dilation)
    (8, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (6, 10, (3, 3), (2, 2), (1, 1), (1, 1)),
    (5, 8, (3, 3), (1, 2), (2, 1), (2, 1)),
    (7, 12, (1, 1), (1, 1), (0, 0), (1, 1)),
    (4, 6, (3, 3), (1, 1), "same", (1, 1)),
    (4, 6, (2, 2), (1, 1), "same", (1, 1)),  # even kernel: uneven 'same' padding
    (4, 6, (3, 3), (1, 1), "valid", (1, 1)),
]


@needs_vnni
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the reference's F.conv2d
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"k{c[2][0]}s{c[3][0]}{c[3][1]}p{c[4]}")
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_conv2d_w8a8_equals_reference(case, mode, gen):
    c, n, kernel, stride, padding, dilation = case
    shape = (n, c, *kernel)
    q = _codes(n, c * kernel[0] * kernel[1], 8, gen)
    geom = ConvGeometry(shape, stride, padding, dilation)
    for dtype, scale, with_bias in (
        (torch.float32, torch.rand(n, 1, generator=gen) * 0.02 + 1e-3, True),
        (torch.bfloat16, torch.tensor([[0.01]]), False),
    ):
        pw = PackedWeight(pack_weight(q, 8), scale, 8, q.shape[1])
        x = _x((2, c, 9, 7), dtype, gen)
        act, bias = _act(mode, x), _bias(n, with_bias, gen)
        want = reference.conv2d(x, pw, act, bias, geom)
        got = ci.conv2d_w8a8(
            x, q, scale, bias, weight_shape=shape, stride=stride, padding=padding, dilation=dilation, a_mode=mode,
            a_scale=act.scale, a_zp=act.zp,
        )  # fmt: skip
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want)


@needs_vnni
@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv2d_split_equals_reference(mode, dtype, gen):
    c, n, split = 10, 12, 6
    shape = (n, c, 3, 3)
    q = _codes(n, c * 9, 8, gen)
    scale = torch.rand(n, 1, generator=gen) * 0.02 + 1e-3
    pw = PackedWeight(pack_weight(q, 8), scale, 8, q.shape[1])
    geom = ConvGeometry(shape, (1, 1), (1, 1), (1, 1))
    x = _x((2, c, 6, 6), dtype, gen)
    x[:, split:] *= 0.1  # the two parts have different ranges
    act, bias = _act(mode, x, split=split), _bias(n, True, gen)
    want = reference.conv2d(x, pw, act, bias, geom)
    got = ci.conv2d_w8a8_split(
        x, q, scale, bias, split=split, weight_shape=shape, padding=(1, 1), a_mode=mode, a_scale=act.scale,
        a_zp=act.zp,
    )  # fmt: skip
    assert torch.equal(got, want)


GROUPED_CASES = [  # (C, N, kernel, stride, padding, dilation, group_size)
    (8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 16),  # groups straddle input channels (9 taps each)
    (6, 10, (3, 3), (2, 2), (1, 1), (1, 1), 20),  # ragged last group
    (5, 8, (3, 3), (1, 2), (2, 1), (2, 1), 9),
    (12, 6, (1, 1), (1, 1), (0, 0), (1, 1), 4),
    (4, 6, (3, 3), (1, 1), "same", (1, 1), 12),
]


@needs_vnni
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: f"k{c[2][0]}s{c[3][0]}{c[3][1]}p{c[4]}g{c[6]}")
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_conv2d_grouped_equals_reference(case, mode, gen):
    """Group-wise (W4A8) Conv2d on cpu_int8: uint8 im2col + group GEMM, equal to the reference's im2col path."""
    c, n, kernel, stride, padding, dilation, gs = case
    shape = (n, c, *kernel)
    k = c * kernel[0] * kernel[1]
    q = _codes(n, k, 4, gen)
    scale = torch.rand(n, -(-k // gs), generator=gen) * torch.logspace(-3, -1, n).reshape(-1, 1)
    pw = PackedWeight(pack_weight(q, 4), scale, 4, k, gs)
    geom = ConvGeometry(shape, stride, padding, dilation)
    be = ci.CpuInt8Backend()
    for dtype, with_bias, split in (
        (torch.float32, True, None),
        (torch.bfloat16, False, None),
        (torch.float32, True, 3),
    ):
        x = _x((2, c, 9, 7), dtype, gen)
        act, bias = _act(mode, x, split=split), _bias(n, with_bias, gen)
        assert be.supports("conv2d", x, pw, act, geom)
        got, want = be.conv2d(x, pw, act, bias, geom), reference.conv2d(x, pw, act, bias, geom)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want)


def test_grouped_conv_with_uneven_same_padding_is_left_to_the_reference(gen):
    """The reference refuses it (an even kernel's 'same' padding); cpu_int8 must not claim it either."""
    q = _codes(6, 4 * 4, 4, gen)
    pw = PackedWeight(pack_weight(q, 4), torch.rand(6, 2, generator=gen), 4, 16, 8)
    geom = ConvGeometry((6, 4, 2, 2), (1, 1), "same", (1, 1))
    assert not ci.CpuInt8Backend().supports("conv2d", torch.randn(1, 4, 5, 5), pw, ActSpec(8, "dynamic"), geom)


# ---- backend adapter ------------------------------------------------------------------------------------------------
@needs_vnni
def test_backend_adapter_equals_reference(gen):
    be = ci.CpuInt8Backend()
    k, n = 64, 16
    q = _codes(n, k, 4, gen)
    pw = PackedWeight(pack_weight(q, 4), torch.rand(n, 2, generator=gen), 4, k, 32)
    x = _x((3, k), torch.bfloat16, gen)
    act = _act("static", x)
    assert be.supports("linear", x, pw, act, None)
    assert torch.equal(be.linear(x, pw, act, None), reference.linear(x, pw, act, None))
    assert not be.supports("linear", x, pw, ActSpec(None), None)
    assert be.device_error(torch.device("cpu"), False) is None
    qc = _codes(n, 8 * 9, 8, gen)
    pwc = PackedWeight(pack_weight(qc, 8), torch.rand(n, 1, generator=gen), 8, qc.shape[1])
    geom = ConvGeometry((n, 8, 3, 3), (1, 1), (1, 1), (1, 1))
    xc = _x((1, 8, 5, 5), torch.float32, gen)
    for act in (ActSpec(8, "dynamic"), ActSpec(8, "dynamic", split=3)):
        assert be.supports("conv2d", xc, pwc, act, geom)
        assert torch.equal(be.conv2d(xc, pwc, act, None, geom), reference.conv2d(xc, pwc, act, None, geom))


@needs_vnni
def test_backend_through_a_registry(gen):
    """Declared in a registry (as the lead will in qdiff/backends/registry.py): self-tested, selected on CPU."""
    from qdiff.backends.registry import Backend, Registry

    reg = Registry(
        (
            ("cpu_int8", "qdiff.backends.cpu_int8:CpuInt8Backend"),
            ("torch", "qdiff.backends.reference:ReferenceBackend"),
        )
    )
    backend, why = reg.backend("cpu_int8")
    assert isinstance(backend, Backend) and why == ""
    q = _codes(16, 32, 8, gen)
    pw = PackedWeight(pack_weight(q, 8), torch.rand(16, 1, generator=gen), 8, 32)
    x, act = _x((4, 32), torch.float32, gen), ActSpec(8, "dynamic")
    assert reg.select("linear", x, pw, act, None, "auto") is backend
    assert torch.equal(reg.dispatch("linear", x, pw, act), reference.linear(x, pw, act, None))


# ---- exactness gate -------------------------------------------------------------------------------------------------
@needs_vnni
def test_gate_passes_here():
    ok, why = ci.self_test(4096)
    assert ok, why
    assert ci.self_test(1 << 20)[0] is False  # int32 accumulation could overflow: refused


_VERBOSE_SCRIPT = """
import torch
from torch import nn
from qdiff.config.layer import LayerQuant
from qdiff.quant.modules import quant_module_for

def frozen(layer, **q):
    m = quant_module_for(layer, LayerQuant(**q))
    if m.qcfg.static_act:
        m.set_act_qparams(torch.tensor(0.1), torch.tensor(-3))
    m.freeze()
    m.kernel = "cpu_int8"
    return m

torch.manual_seed(0)
x, xc = torch.randn(16, 64), torch.randn(1, 8, 6, 6)
layers = [(frozen(nn.Linear(64, 32), a_mode="dynamic"), x), (frozen(nn.Linear(64, 32), a_mode="static"), x),
          (frozen(nn.Linear(64, 32), w_bits=4, granularity="group", group_size=32), x),
          (frozen(nn.Conv2d(8, 32, 3, padding=1)), xc), (frozen(nn.Conv2d(64, 64, 1)), torch.randn(1, 64, 4, 4)),
          (frozen(nn.Conv2d(8, 32, 3, padding=1), a_split=3), xc)]
with torch.inference_mode():
    for rep in range(2):  # the second round must find every weight packed, after the layers released their codes
        print("CALLS", rep, flush=True)
        for m, inp in layers:
            m(inp)
print("RELEASED", all(m.codes_released() for m, _ in layers), flush=True)
"""


def _onednn_calls(script: str) -> list[list[str]]:
    """Per ``CALLS`` marker of the script, the oneDNN primitives it executed (ONEDNN_VERBOSE lines, split)."""
    env = dict(os.environ, ONEDNN_VERBOSE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    blocks: list[list[str]] = []
    assert "RELEASED True" in out.stdout
    for line in out.stdout.splitlines():
        if line.startswith("CALLS"):
            blocks.append([])
        elif blocks and line.startswith("onednn_verbose,v1,primitive,exec"):
            blocks[-1].append(line)
    return [[",".join(line.split(",")[5:7]) for line in block] for block in blocks]


@needs_vnni
def test_runs_the_vnni_kernels_without_per_call_weight_reorders():
    """oneDNN falls back silently: an int8 (not uint8) source runs its ref_int8 kernel (exact, ~1000x slower), and
    a 1x1 conv weight packed without a shape hint is reordered twice per call. Neither may happen."""
    first, second = _onednn_calls(_VERBOSE_SCRIPT)
    compute = [p for p in second if p.split(",")[0] in ("matmul", "convolution")]
    assert len(compute) >= 8 and not [p for p in compute if ":ref" in p or "ref_" in p or ",ref" in p], compute
    assert not [p for p in second if p.startswith("reorder")], second  # weights stay packed once


_GATE_SCRIPT = """
import json, torch
from qdiff.backends import cpu_int8 as ci
print(json.dumps([ci.self_test(1280), ci.self_test(1280, w_bits=4)]))
"""


@needs_vnni
def test_gate_fails_on_the_non_vnni_code_path():
    """AVX2 dispatch (as on CPUs without VNNI) saturates int16 pair sums: the gate must say so."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", FBGEMM_ENABLE_INSTRUCTIONS="AVX2", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _GATE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (ok8, why8), (ok4, why4) = json.loads(out.stdout.strip().splitlines()[-1])
    assert not ok8 and "differ from the exact result" in why8
    assert ok4, why4  # 4-bit weights (|w| <= 7) stay exact on that path


@pytest.mark.skipif(HAS_VNNI, reason="this CPU has VNNI: the gate passes (tested above)")
def test_gate_refuses_a_cpu_without_vnni():
    ok, why = ci.self_test(1280)
    assert not ok and "differ from the exact result" in why


_FALLBACK_SCRIPT = """
import json, torch
import qdiff
from qdiff.backends.registry import REGISTRY, recording
from qdiff.models.tiny import tiny_sd_pipeline
from qdiff.quant.transform import quantized_layers

pipe = qdiff.quantize(tiny_sd_pipeline(0), "w8a8", progress=False)
def images():
    gen = torch.Generator().manual_seed(3)
    return pipe("a cat", num_inference_steps=1, guidance_scale=1.0, height=32, width=32, generator=gen,
                output_type="pt").images
with recording() as calls:
    auto = images()
for m in quantized_layers(pipe.unet).values():
    m.kernel = "torch"
reference = images()
released = any(m.codes_released() for m in quantized_layers(pipe.unet).values())
print(json.dumps([sorted({name for name, _ in calls}), bool(torch.equal(auto, reference)),
                  dict(REGISTRY.describe("cpu"))["cpu_int8"], released]))
"""


def test_non_vnni_path_falls_back_to_the_reference_and_images_stay_exact():
    """Issue 16: where the int8 kernels are inexact, the gate turns cpu_int8 off and auto runs the reference."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", FBGEMM_ENABLE_INSTRUCTIONS="AVX2", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    backends, exact, status, released = json.loads(out.stdout.strip().splitlines()[-1])
    assert backends == ["torch"]  # every frozen layer ran on the reference
    assert exact and not released  # nothing prepacked: every layer keeps its own codes
    assert status.startswith("off: kernel 'cpu_int8' failed its self-test") and "differ from the exact" in status
    assert "kernel 'cpu_int8' skipped: self-test failed" in out.stderr  # reported once, as a log line
