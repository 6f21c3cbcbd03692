"""Tests for qdiff.calib.metrics against closed forms and an explicit-loop SSIM reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qdiff.calib.metrics import psnr, sqnr_db, ssim


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------------
# SQNR / PSNR closed forms
# --------------------------------------------------------------------------------------------------------------------


def test_sqnr_closed_form():
    ref = torch.ones(100, dtype=torch.float64)  # float64 so that 0.1 is the float64 0.1 of the closed form
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-9)  # 100 / (100 * 0.01) = 100 -> 20 dB
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, torch.tensor([3.0, 5.0])) == pytest.approx(10 * math.log10(25.0), abs=1e-12)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf


def test_sqnr_float64_and_dtypes():
    g = _gen(0)
    ref = torch.randn(64, 64, generator=g, dtype=torch.float64)
    noise = 1e-6 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    expected = 10 * math.log10(float((ref**2).sum()) / float((noise**2).sum()))
    assert sqnr_db(ref, ref + noise) == pytest.approx(expected, abs=1e-9)  # ~120 dB: no float32 rounding floor
    assert isinstance(sqnr_db(ref.half(), ref.float()), float)
    with pytest.raises(ValueError):
        sqnr_db(torch.zeros(3), torch.zeros(4))


def test_psnr_closed_form():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-9)  # mse 0.01, range 1
    assert psnr(a, a + 25.5, data_range=255.0) == pytest.approx(20.0, abs=1e-9)
    assert psnr(a, a) == math.inf
    b = a.clone()
    b[0, 0, 0, 0] = 1.0  # mse = 1 / 96
    assert psnr(a, b) == pytest.approx(10 * math.log10(96.0), abs=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------------------------------


def ref_ssim(a: np.ndarray, b: np.ndarray, data_range: float, size: int, sigma: float) -> np.ndarray:
    """Wang et al. 2004 SSIM, written out with explicit loops over every valid window position (float64)."""
    half = (size - 1) / 2.0
    k1d = np.array([math.exp(-((i - half) ** 2) / (2 * sigma * sigma)) for i in range(size)])
    kern = np.outer(k1d, k1d)
    kern /= kern.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    B, C, H, W = a.shape
    out = np.zeros(B)
    for n in range(B):
        vals = []
        for c in range(C):
            for i in range(H - size + 1):
                for j in range(W - size + 1):
                    pa = a[n, c, i : i + size, j : j + size]
                    pb = b[n, c, i : i + size, j : j + size]
                    mu_a, mu_b = (kern * pa).sum(), (kern * pb).sum()
                    var_a = (kern * (pa - mu_a) ** 2).sum()
                    var_b = (kern * (pb - mu_b) ** 2).sum()
                    cov = (kern * (pa - mu_a) * (pb - mu_b)).sum()
                    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
                    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
                    vals.append(num / den)
        out[n] = np.mean(vals)
    return out


def _image_pair(shape, seed: int, noise: float = 0.1):
    g = _gen(seed)
    a = torch.rand(*shape, generator=g, dtype=torch.float64)
    b = (a + noise * torch.randn(*shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def test_ssim_identical_is_one():
    a, _ = _image_pair((2, 3, 20, 17), 0)
    s = ssim(a, a)
    assert s.shape == (2,) and s.dtype == torch.float64
    torch.testing.assert_close(s, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert ssim(a[0].float(), a[0].float()).shape == (1,)  # (C, H, W) -> one image


@pytest.mark.parametrize("window,sigma", [(11, 1.5), (7, 1.5), (5, 0.8)])
def test_ssim_matches_loop_reference(window, sigma):
    a, b = _image_pair((2, 2, 16, 13), window)
    got = ssim(a, b, window=window, sigma=sigma)
    want = ref_ssim(a.numpy(), b.numpy(), 1.0, window, sigma)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    assert np.all(want < 1.0) and np.all(want > 0.0)


def test_ssim_data_range_and_float32_input():
    a, b = _image_pair((1, 3, 12, 12), 3)
    want = ref_ssim(a.numpy() * 255, b.numpy() * 255, 255.0, 11, 1.5)
    got = ssim(a * 255, b * 255, data_range=255.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(ssim(a, b).numpy(), want, rtol=1e-10)  # SSIM is scale invariant with data_range
    got32 = ssim(a.float(), b.float())
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-5)


def test_ssim_window_shrinks_to_image():
    a, b = _image_pair((1, 1, 6, 9), 4)
    got = ssim(a, b)  # 11 > 6: shrunk to 6, made odd -> 5
    np.testing.assert_allclose(got.numpy(), ref_ssim(a.numpy(), b.numpy(), 1.0, 5, 1.5), rtol=1e-10)
    a, b = _image_pair((1, 1, 7, 30), 5)
    np.testing.assert_allclose(ssim(a, b).numpy(), ref_ssim(a.numpy(), b.numpy(), 1.0, 7, 1.5), rtol=1e-10)


def test_ssim_constant_images_closed_form():
    # constant images: zero variances, so SSIM = (2 x y + C1) / (x^2 + y^2 + C1)
    x, y = 0.3, 0.7
    c1 = 0.01**2
    got = ssim(torch.full((1, 1, 12, 12), x), torch.full((1, 1, 12, 12), y))
    assert float(got[0]) == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-6)


def test_ssim_orders_by_noise_and_rejects_bad_shapes():
    a, b1 = _image_pair((1, 3, 24, 24), 6, noise=0.02)
    _, b2 = _image_pair((1, 3, 24, 24), 6, noise=0.2)
    assert float(ssim(a, b1)[0]) > float(ssim(a, b2)[0])
    with pytest.raises(ValueError):
        ssim(a, a[..., :-1])
    with pytest.raises(ValueError):
        ssim(a[0, 0], a[0, 0])
