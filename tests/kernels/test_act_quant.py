"""Activation quantization kernels vs independent references: bit-identical codes and scales."""

from __future__ import annotations

import pytest
import torch
from qdiff._kernels.act_quant import quantize_dynamic, quantize_given

from qdiff.numerics.primitives import compute_qparams, quantize, token_qparams


def _py_round_codes(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Python's round() is round-half-even on exact binary floats; clamp to the code range."""
    return torch.tensor([min(max(round(float(t)), lo), hi) for t in v.reshape(-1)], dtype=torch.int8).reshape(v.shape)


def test_ties_round_half_to_even(kdev):
    """x / scale exactly k + 0.5 (scale 1, exact division), plus the largest floats below/above each tie."""
    k = torch.arange(-140, 140, dtype=torch.float32)
    ties = k + 0.5
    below = torch.nextafter(ties, torch.full_like(ties, -1e9))
    above = torch.nextafter(ties, torch.full_like(ties, 1e9))
    extra = torch.tensor([0.49999997, -0.49999997, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.0, -0.0, 8388607.5, 1e30])
    x = torch.cat([ties, below, above, extra]).reshape(1, -1)
    one = torch.ones(1)
    q = quantize_given(x.to(kdev), one.to(kdev), None, -128, 127).cpu()
    assert torch.equal(q, _py_round_codes(x, -128, 127))
    assert torch.equal(q, quantize(x, one, None, 8, symmetric=False))


def test_division_is_correctly_rounded(kdev, gen):
    """Quotients within an ulp of a tie with non-power-of-two scales: an approximate division flips some codes."""
    scale = torch.tensor([0.0123457], dtype=torch.float32)
    k = torch.randint(-120, 120, (4096,), generator=gen).float() + 0.5
    x = (k * scale).reshape(1, -1)  # rounded product: x / scale lands on either side of k + 0.5
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)], dim=1)
    q = quantize_given(x.to(kdev), scale.to(kdev), None, -128, 127).cpu()
    exact = (x.double() / scale.double()).float()  # float64 quotient rounded once: the correctly rounded fp32 one
    assert torch.equal(q, _py_round_codes(exact, -128, 127))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_per_token_matches_reference(kdev, gen, dtype, bits):
    m, k = 37, 301  # neither divides the interpreter blocks (16 x 512)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    x[3] = 0  # all-zero token: scale clamps to eps
    qmax = 2 ** (bits - 1) - 1
    scale_ref = torch.maximum(x.float().abs().amax(1).double() / qmax, torch.tensor(1e-8).double()).float()
    q_poison = torch.full((m, k), -128, dtype=torch.int8, device=kdev)  # -128 is never a symmetric code
    s_poison = torch.full((m,), float("nan"), device=kdev)
    q, s = quantize_dynamic(x.to(kdev), bits, out=(q_poison, s_poison))
    assert torch.equal(s.cpu(), scale_ref)
    assert torch.equal(s.cpu(), token_qparams(x.float(), bits)[0][:, 0])
    assert torch.equal(q.cpu(), quantize(x.float(), scale_ref[:, None], None, bits, symmetric=True))


def test_dynamic_strided_input(kdev, gen):
    x = torch.randn(40, 96, generator=gen).t()  # (96, 40), column-major view
    q, s = quantize_dynamic(x.to(kdev))
    scale, _ = token_qparams(x, 8)
    assert torch.equal(q.cpu(), quantize(x, scale, None, 8, symmetric=True))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("poison", [77, -77])
def test_given_scale_and_zero_point(kdev, gen, per_row, poison):
    m, k = 21, 1100  # K spans two interpreter blocks, ragged
    x = torch.randn(m, k, generator=gen) * 4 + 1.5
    if per_row:
        scale = torch.rand(m, generator=gen) * 0.05 + 0.01
        zp, lo, hi = None, -127, 127
    else:
        scale, zp = compute_qparams(x.min(), x.max(), 8, symmetric=False)
        lo, hi = -128, 127
    out = torch.full((m, k), poison, dtype=torch.int8, device=kdev)
    zp_dev = None if zp is None else zp.to(kdev)
    q = quantize_given(x.to(kdev), scale.reshape(-1).to(kdev), zp_dev, lo, hi, out=out).cpu()
    s2 = scale.reshape(-1, 1) if per_row else scale
    exact = (x.double() / s2.double()).float()
    expected = _py_round_codes(exact.double() + (0 if zp is None else int(zp)), lo, hi)
    assert torch.equal(q, expected)
    assert torch.equal(q, quantize(x, s2, zp, 8, symmetric=zp is None))


def test_bad_shapes_raise(kdev):
    with pytest.raises(ValueError, match="scale must have"):
        quantize_given(torch.zeros(4, 8, device=kdev), torch.ones(3, device=kdev), None, -127, 127)
    with pytest.raises(ValueError, match="floating"):
        quantize_dynamic(torch.zeros(4, 8, dtype=torch.int8, device=kdev))
