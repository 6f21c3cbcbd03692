"""Integer matmul/conv ops for frozen quantized layers, with kernel dispatch.

The torch path here is the *reference*: activations are quantized with the same primitives as the
fake-quant path, the integer products are accumulated exactly (integer values held in float32
when the worst-case sum stays below 2**24, float64 otherwise), then the scales are applied in an
fp32 epilogue. Triton kernels plug in behind the same functions (``KernelPreference``).
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.errors import QdiffError
from qdiff.quant.primitives import (
    compute_qparams,
    dequantize_weight,
    qrange,
    quantize,
    token_qparams,
    unpack_weight,
)

_FP32_EXACT = 2**24


class KernelPreference(str, enum.Enum):
    """Which implementation runs frozen layers: ``auto`` picks Triton on CUDA when available."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


def resolve_backend(preference: KernelPreference | str, device: torch.device) -> str:
    """Name of the backend that will run on ``device`` (``"torch"`` until the Triton kernels land)."""
    pref = KernelPreference(preference)
    if pref is KernelPreference.TRITON:
        raise QdiffError(
            "kernel 'triton' requested, but qdiff's Triton kernels are not part of this version; use 'auto'"
        )
    return "torch"


def _exact_dtype(k: int, a_abs: int, w_abs: int) -> torch.dtype:
    """float32 holds every partial sum exactly while k*|a|*|w| < 2**24; else float64."""
    return torch.float32 if k * a_abs * w_abs < _FP32_EXACT else torch.float64


def quantize_act_tokens(x2d: Tensor, a_bits: int, a_mode: str, a_scale: Tensor | None, a_zp: Tensor | None):
    """Quantize activations (M, K) -> (q - zp as exact integers in float32 (M, K), scale (M,1) or (1,1)).

    dynamic: symmetric per token (row); static: asymmetric per tensor with the calibrated (scale, zp).
    """
    if a_mode == "dynamic":
        scale, zp = token_qparams(x2d, a_bits)
        q = quantize(x2d, scale, zp, a_bits, symmetric=True)
        return q.float(), scale
    q = quantize(x2d, a_scale, a_zp, a_bits, symmetric=False)
    return q.float() - a_zp.float(), a_scale.reshape(1, 1)


def _act_abs_max(a_bits: int, a_mode: str) -> int:
    lo, hi = qrange(a_bits, symmetric=a_mode == "dynamic")
    return hi - lo if a_mode == "static" else hi  # |q - zp| <= qmax - qmin when asymmetric


def int_gemm(qa: Tensor, qw: Tensor, a_abs: int, w_abs: int) -> Tensor:
    """Exact integer GEMM: (M, K) x (N, K)^T -> (M, N) integer values (float32 or float64)."""
    dtype = _exact_dtype(qa.shape[-1], a_abs, w_abs)
    return qa.to(dtype) @ qw.to(dtype).t()


def linear_int(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    *,
    w_bits: int,
    in_features: int,
    group_size: int | None,
    bias: Tensor | None,
    a_bits: int | None,
    a_mode: str,
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
) -> Tensor:
    """y = x @ W^T + b for a frozen layer. x (..., K); qweight packed (N, K*bits/8); w_scale (N,1)/(N,G)/(1,1)."""
    out_dtype = x.dtype
    qw = unpack_weight(qweight, w_bits, in_features)  # (N, K) int8
    if a_bits is None:  # weight-only (W*A16)
        w = dequantize_weight(qw, w_scale, group_size).to(out_dtype)
        return F.linear(x, w, None if bias is None else bias.to(out_dtype))
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).float()
    qa, sa = quantize_act_tokens(x2d, a_bits, a_mode, a_scale, a_zp)  # (M, K), (M,1)|(1,1)
    a_abs, w_abs = _act_abs_max(a_bits, a_mode), qrange(w_bits, True)[1]
    if group_size is None or w_scale.shape[1] == 1:
        acc = int_gemm(qa, qw, a_abs, w_abs)  # (M, N)
        y = acc.float() * w_scale.reshape(1, -1).float()
    else:  # group-wise: each group's exact integer sum gets its own scale
        y = linear_int_from_ints(qa, qw, w_scale, group_size, a_abs, w_abs)
    y = y * sa.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, qw.shape[0])


def _conv_act(x: Tensor, a_bits: int, a_mode: str, a_scale: Tensor | None, a_zp: Tensor | None):
    """Conv activations (B, C, H, W) -> (q - zp exact, scale (B,1,1,1) or (1,1,1,1)); dynamic is per sample."""
    xf = x.float()
    if a_mode == "dynamic":
        amax = xf.abs().amax(dim=(1, 2, 3), keepdim=True)
        scale, zp = compute_qparams(-amax, amax, a_bits, symmetric=True)
        return quantize(xf, scale, zp, a_bits, symmetric=True).float(), scale
    q = quantize(xf, a_scale, a_zp, a_bits, symmetric=False)
    return q.float() - a_zp.float(), a_scale.reshape(1, 1, 1, 1)


def conv2d_int(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    *,
    w_bits: int,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    group_size: int | None,
    bias: Tensor | None,
    a_bits: int | None,
    a_mode: str,
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
) -> Tensor:
    """Frozen Conv2d (groups=1). Padding happens on ``q - zp`` so padded pixels are exact zeros."""
    out_dtype = x.dtype
    n, c, kh, kw = weight_shape
    k = c * kh * kw
    qw = unpack_weight(qweight, w_bits, k)  # (N, K) int8
    if a_bits is None:
        w = dequantize_weight(qw, w_scale, group_size).reshape(weight_shape).to(out_dtype)
        b = None if bias is None else bias.to(out_dtype)
        return F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation)
    qa, sa = _conv_act(x, a_bits, a_mode, a_scale, a_zp)
    a_abs, w_abs = _act_abs_max(a_bits, a_mode), qrange(w_bits, True)[1]
    if group_size is None or w_scale.shape[1] == 1:
        dtype = _exact_dtype(k, a_abs, w_abs)
        acc = F.conv2d(
            qa.to(dtype), qw.to(dtype).reshape(weight_shape), stride=stride, padding=padding, dilation=dilation
        )
        y = acc.float() * w_scale.reshape(1, -1, 1, 1).float()  # (N,1) per channel or (1,1) per tensor
    else:  # group-wise weights: im2col, then one exact integer GEMM per group
        cols = F.unfold(qa, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, K, L)
        b, _, length = cols.shape
        out_h, out_w = _conv_out_hw(x.shape[-2:], (kh, kw), stride, padding, dilation)
        y2d = linear_int_from_ints(cols.transpose(1, 2).reshape(-1, k), qw, w_scale, group_size, a_abs, w_abs)
        y = y2d.reshape(b, length, n).transpose(1, 2).reshape(b, n, out_h, out_w)
    y = y * sa.float()
    if bias is not None:
        y = y + bias.float().reshape(1, n, 1, 1)
    return y.to(out_dtype)


def linear_int_from_ints(qa: Tensor, qw: Tensor, w_scale: Tensor, group_size: int, a_abs: int, w_abs: int) -> Tensor:
    """Group-wise sum of exact integer GEMMs: (M, K) x (N, K) -> (M, N) fp32, activation scale not applied."""
    k = qa.shape[1]
    y = qa.new_zeros(qa.shape[0], qw.shape[0], dtype=torch.float32)
    for g in range(w_scale.shape[1]):
        sl = slice(g * group_size, min((g + 1) * group_size, k))
        y += int_gemm(qa[:, sl], qw[:, sl], a_abs, w_abs).float() * w_scale[:, g].reshape(1, -1).float()
    return y


def _conv_out_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    if isinstance(padding, str):
        raise QdiffError("string padding is not supported for quantized group-wise Conv2d")
    return tuple(
        math.floor((hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i] + 1) for i in range(2)
    )


__all__ = ["KernelPreference", "resolve_backend", "linear_int", "conv2d_int", "int_gemm"]
