"""uint8 activation codes for the CPU int8 kernels: equal to the reference quantizer, ties and clamps included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qdiff.backends.int8_acts import im2col_u8, quantize_act, u8_codes
from qdiff.numerics.primitives import compute_qparams, qrange, quantize


def _reference_codes(xf: torch.Tensor, scale: torch.Tensor, zp: int, bits: int, symmetric: bool) -> torch.Tensor:
    """The reference int8 codes (``primitives.quantize``) offset by 128, as int16."""
    zpt = None if symmetric else torch.tensor(zp)
    return quantize(xf, scale, zpt, bits, symmetric=symmetric).to(torch.int16) + 128


def _adversarial(scale: float, gen: torch.Generator) -> torch.Tensor:
    """Exact ties k + 0.5 (half to even must hold), values just beside them, far outliers and signed zeros."""
    k = torch.arange(-140, 141, dtype=torch.float32)
    ties = (k + 0.5) * scale
    beside = torch.cat([torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    rand = torch.randn(4000, generator=gen) * 60 * scale
    return torch.cat([ties, beside, rand, torch.tensor([0.0, -0.0, 1e30, -1e30, 3e38, -3e38])])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("zp", [0, 1, -3, 7, -128, 127])
def test_u8_codes_equal_reference_on_ties_and_clamps(bits, zp, gen):
    lo, hi = qrange(bits, False)
    zp = max(lo, min(hi, zp))
    scale = torch.tensor([0.25])  # a power of two: x / scale is exact, so the ties stay ties
    x = _adversarial(0.25, gen)
    got = u8_codes(x, scale, zp, lo, hi)
    assert got.dtype == torch.uint8
    assert torch.equal(got.to(torch.int16), _reference_codes(x, scale, zp, bits, symmetric=False))
    # ties really went to even: (k + 0.5) with k even stays k (then clamped)
    assert int(u8_codes(torch.tensor([0.5 * 0.25]), scale, 0, lo, hi)) == 128
    assert int(u8_codes(torch.tensor([1.5 * 0.25]), scale, 0, lo, hi)) == 130


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 50), (3, 5, 6, 7)])
def test_quantize_act_dynamic_equals_reference(dtype, shape, gen):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    x.view(-1)[::11] *= 40
    x[0] = 0  # an all-zero row / sample: the scale's eps clamp
    codes, zp, scale = quantize_act(x, 8, "dynamic", None, None)
    xf = x.float()
    absmax = xf.flatten(1).abs().amax(1).reshape(-1, *([1] * (x.dim() - 1)))
    want_scale = compute_qparams(-absmax, absmax, 8, symmetric=True)[0]
    assert zp == 128 and torch.equal(scale, want_scale)
    assert torch.equal(codes.to(torch.int16), _reference_codes(xf, want_scale, 0, 8, symmetric=True))


def test_quantize_act_static_odd_zero_point(gen):
    x = torch.randn(64, 40, generator=gen) * 4
    a_scale, a_zp = compute_qparams(torch.tensor(-1.3), torch.tensor(2.9), 8, symmetric=False)
    assert int(a_zp) % 2 == 1  # the uint8 wrap-around branch
    codes, zpu, _ = quantize_act(x, 8, "static", a_scale, a_zp)
    assert zpu == int(a_zp) + 128
    assert torch.equal(codes.to(torch.int16), _reference_codes(x, a_scale, int(a_zp), 8, symmetric=False))


@pytest.mark.parametrize(
    "kernel,stride,pads,dilation",
    [
        ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
        ((3, 2), (2, 1), (0, 1, 2, 0), (1, 2)),
        ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    ],
)
def test_im2col_u8_equals_unfold(kernel, stride, pads, dilation, gen):
    q = torch.randint(0, 256, (2, 5, 7, 6), generator=gen, dtype=torch.uint8)
    cols, ho, wo = im2col_u8(q, kernel, stride, pads, dilation, fill=131)
    top, bottom, left, right = pads
    padded = F.pad(q.double(), (left, right, top, bottom), value=131.0)
    want = F.unfold(padded, kernel, dilation=dilation, stride=stride)  # (B, K, L)
    assert cols.shape == (2 * ho * wo, 5 * kernel[0] * kernel[1])
    assert torch.equal(cols.double(), want.transpose(1, 2).reshape(-1, want.shape[1]))
