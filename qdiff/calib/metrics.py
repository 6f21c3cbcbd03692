"""Fidelity metrics: SQNR (tensors), PSNR and SSIM (images). All computed in float64."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sqnr_db", "psnr", "ssim"]

_K1 = 0.01
_K2 = 0.03


def _check_same_shape(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||test - ref||^2)`` in dB (float64).

    ``+inf`` when ``test == ref``; ``-inf`` when ``ref`` is all zeros but ``test`` is not.
    """
    _check_same_shape(ref, test)
    r = ref.detach().to(torch.float64)
    t = test.detach().to(device=r.device, dtype=torch.float64)
    signal = float(r.square().sum())
    noise = float((t - r).square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> float:
    """PSNR ``10 log10(data_range^2 / mean((a - b)^2))`` in dB over all elements (float64); ``+inf`` if equal."""
    _check_same_shape(a, b)
    x = a.detach().to(torch.float64)
    y = b.detach().to(device=x.device, dtype=torch.float64)
    mse = float((x - y).square().mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(float(data_range) ** 2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian ``(size,)`` float64 centred on the middle tap."""
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, per image.

    ``a``, ``b``: ``(B, C, H, W)`` or ``(C, H, W)`` in ``[0, data_range]``. Gaussian window ``window x window``
    (std ``sigma``), ``K1 = 0.01``, ``K2 = 0.03``, population (biased) local statistics, 'valid' convolution; the SSIM
    map is averaged over channels and pixels. A window larger than the image is shrunk to ``min(H, W)`` (made odd).
    Returns float64 ``(B,)`` (``(1,)`` for a single ``(C, H, W)`` image).
    """
    _check_same_shape(a, b)
    if a.dim() == 3:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W) or (C, H, W), got shape {tuple(a.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    x = a.detach().to(torch.float64)
    y = b.detach().to(device=x.device, dtype=torch.float64)
    _, C, H, W = x.shape
    size = min(window, H, W)
    if size % 2 == 0:
        size -= 1
    g = _gaussian_window(size, sigma, x.device)
    gh = g.reshape(1, 1, size, 1).expand(C, 1, size, 1)
    gw = g.reshape(1, 1, 1, size).expand(C, 1, 1, size)

    def filt(t: Tensor) -> Tensor:  # separable depthwise 'valid' Gaussian filter
        return F.conv2d(F.conv2d(t, gh, groups=C), gw, groups=C)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x * mu_x
    syy = filt(y * y) - mu_y * mu_y
    sxy = filt(x * y) - mu_x * mu_y
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=(1, 2, 3))
