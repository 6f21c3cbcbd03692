"""Integer matmul/conv ops for frozen quantized layers, with kernel dispatch.

The torch path here is the *reference*: activations are quantized with the same primitives as the
fake-quant path, the integer products are accumulated exactly (integer values held in float32
when the worst-case sum stays below 2**24, float64 otherwise), then the scales are applied in an
fp32 epilogue. The Triton kernels (:mod:`qdiff.backends.triton_ops`, device code in ``qdiff._kernels``) run
behind the same functions when the tensor is on CUDA and Triton imports (``KernelPreference``); they are
imported lazily, on the first call that dispatches to them.
"""

from __future__ import annotations

import enum
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.errors import QdiffError
from qdiff.numerics.primitives import (
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


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(preference: KernelPreference | str, device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``.

    auto: Triton on CUDA when it imports, else torch. torch: always the reference. triton: CUDA, or CPU
    through the Triton interpreter when ``TRITON_INTERPRET=1`` is set (tests); anything else is an error.
    Layers no kernel covers (2-bit or weight-only) use the torch path whatever the backend.
    """
    try:
        pref = KernelPreference(preference)
    except ValueError:
        raise QdiffError(f"kernel: got {preference!r}, allowed values are auto, torch, triton") from None
    dev = torch.device(device)
    if pref is KernelPreference.TORCH:
        return "torch"
    if dev.type == "cuda" and triton_available():
        return "triton"
    if pref is KernelPreference.AUTO:
        return "torch"
    if not triton_available():
        raise QdiffError("kernel 'triton' requested but triton is not installed (pip install 'qdiff[triton]')")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    raise QdiffError(
        f"kernel 'triton' requested for a tensor on {dev.type}: Triton needs CUDA "
        "(or TRITON_INTERPRET=1 for the CPU interpreter); use kernel 'auto' or 'torch'"
    )


def weight_sums(qweight: Tensor, w_bits: int, k: int, group_size: int | None, groups: int) -> Tensor:
    """Per-group sums of the weight codes, int32 (N, groups), for folding a static activation zero-point.

    ``sum_k (q_a - zp) * w = sum_k q_a * w - zp * sum_k w`` per group, so the GEMM keeps int8 operands.
    """
    qw = unpack_weight(qweight, w_bits, k).to(torch.int32)  # (N, K)
    if groups == 1:
        return qw.sum(dim=1, keepdim=True, dtype=torch.int32)
    qw = F.pad(qw, (0, groups * group_size - k))
    return qw.reshape(qw.shape[0], groups, group_size).sum(dim=2, dtype=torch.int32)


def _triton_ops(w_bits: int, a_bits: int | None, group_size: int | None, w_scale: Tensor):
    """The lazily imported Triton module when a kernel covers this layer, else None."""
    if a_bits is None or w_bits not in (3, 4, 8):  # 2-bit (4 per byte) and weight-only: torch path
        return None
    if group_size and w_scale.shape[1] > 1 and group_size % 16:  # tl.dot needs K tiles of >= 16
        return None
    from qdiff.backends import triton_ops as ops_triton

    return ops_triton


def _exact_dtype(k: int, a_abs: int, w_abs: int, device: torch.device | None = None) -> torch.dtype:
    """float32 holds every partial sum exactly while k*|a|*|w| < 2**24; else float64.

    On CUDA always float64: cuBLAS/cuDNN may run float32 as TF32 (cuDNN convs do by default), which is not exact.
    """
    if device is not None and device.type == "cuda":
        return torch.float64
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
    dtype = _exact_dtype(qa.shape[-1], a_abs, w_abs, qa.device)
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
    kernel: KernelPreference | str = KernelPreference.AUTO,
    w_sum: Tensor | None = None,
) -> Tensor:
    """y = x @ W^T + b for a frozen layer. x (..., K); qweight packed (N, K*bits/8); w_scale (N,1)/(N,G)/(1,1).

    ``kernel`` picks the backend (:func:`resolve_backend`); ``w_sum`` optionally caches
    :func:`weight_sums` for the Triton path of static activations.
    """
    if resolve_backend(kernel, x.device) == "triton" and (tri := _triton_ops(w_bits, a_bits, group_size, w_scale)):
        return tri.linear_int(
            x, qweight, w_scale, w_bits=w_bits, in_features=in_features, group_size=group_size, bias=bias,
            a_bits=a_bits, a_mode=a_mode, a_scale=a_scale, a_zp=a_zp, w_sum=w_sum,
        )  # fmt: skip
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
    kernel: KernelPreference | str = KernelPreference.AUTO,
    w_sum: Tensor | None = None,
) -> Tensor:
    """Frozen Conv2d (groups=1). Padding happens on ``q - zp`` so padded pixels are exact zeros."""
    if resolve_backend(kernel, x.device) == "triton" and (tri := _triton_ops(w_bits, a_bits, group_size, w_scale)):
        y = tri.conv2d_int(
            x, qweight, w_scale, w_bits=w_bits, weight_shape=weight_shape, stride=stride, padding=padding,
            dilation=dilation, group_size=group_size, bias=bias, a_bits=a_bits, a_mode=a_mode, a_scale=a_scale,
            a_zp=a_zp, w_sum=w_sum,
        )  # fmt: skip
        if y is not None:  # None: asymmetric 'same' padding, handled by the reference below
            return y
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
    geometry = (stride, padding, dilation, group_size)
    y = _conv_int_weighted(qa, qw.reshape(weight_shape), w_scale, geometry, a_abs, w_abs) * sa.float()
    if bias is not None:
        y = y + bias.float().reshape(1, n, 1, 1)
    return y.to(out_dtype)


def _conv_int_weighted(qa: Tensor, qw: Tensor, w_scale: Tensor, geometry: tuple, a_abs: int, w_abs: int) -> Tensor:
    """Exact integer conv of ``qa`` (B, C, H, W) with codes ``qw`` (N, C, kh, kw), times the weight scales (fp32).

    ``geometry`` = (stride, padding, dilation, group_size); the activation scale is not applied.
    """
    stride, padding, dilation, group_size = geometry
    n, c, kh, kw = qw.shape
    k = c * kh * kw
    if group_size is None or w_scale.shape[1] == 1:
        dtype = _exact_dtype(k, a_abs, w_abs, qa.device)
        acc = F.conv2d(qa.to(dtype), qw.to(dtype), stride=stride, padding=padding, dilation=dilation)
        return acc.float() * w_scale.reshape(1, -1, 1, 1).float()  # (N,1) per channel or (1,1) per tensor
    # group-wise weights: im2col, then one exact integer GEMM per group
    padding = explicit_padding(padding, (kh, kw), dilation)
    if padding is None:
        raise QdiffError("padding='same' with an even kernel is not supported for quantized group-wise Conv2d")
    cols = F.unfold(qa, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, K, L)
    b, _, length = cols.shape
    out_h, out_w = _conv_out_hw(qa.shape[-2:], (kh, kw), stride, padding, dilation)
    cols2d = cols.transpose(1, 2).reshape(-1, k)  # (B*L, K)
    y2d = linear_int_from_ints(cols2d, qw.reshape(n, k), w_scale, group_size, a_abs, w_abs)
    # contiguous NCHW like F.conv2d's output (a channels-last view would change downstream float rounding)
    return y2d.reshape(b, length, n).transpose(1, 2).reshape(b, n, out_h, out_w).contiguous()


def conv2d_int_split(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    *,
    split: int,
    w_bits: int,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    group_size: int | None,
    bias: Tensor | None,
    a_bits: int,
    a_mode: str,
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
) -> Tensor:
    """Frozen Conv2d whose input channels ``[0, split)`` and ``[split, C)`` have separate activation quantizers.

    Q-Diffusion's shortcut splitting (Li et al., ICCV 2023): ``y = s1 * conv(q1, W[:, :split]) +
    s2 * conv(q2, W[:, split:]) + b`` with each part quantized like :func:`conv2d_int` (static: ``a_scale`` /
    ``a_zp`` of shape (2,), one per part; dynamic: per sample and part). Weights keep their scales over all
    input channels. Torch reference only, whatever the kernel preference: no Triton kernel takes two
    activation scales.
    """
    out_dtype = x.dtype
    n, c, kh, kw = weight_shape
    qw = unpack_weight(qweight, w_bits, c * kh * kw).reshape(weight_shape)  # (N, C, kh, kw) int8
    a_abs, w_abs = _act_abs_max(a_bits, a_mode), qrange(w_bits, True)[1]
    geometry = (stride, padding, dilation, group_size)
    grouped = group_size is not None and w_scale.shape[1] > 1
    y = None
    for part, (lo, hi) in enumerate(((0, split), (split, c))):
        scale = None if a_scale is None else a_scale.reshape(2)[part]
        zp = None if a_zp is None else a_zp.reshape(2)[part]
        qa, sa = _conv_act(x[:, lo:hi], a_bits, a_mode, scale, zp)  # (B, hi-lo, H, W)
        if grouped:  # a weight group may straddle the split: zero the other part's channels instead of slicing
            full = qa.new_zeros(qa.shape[0], c, *qa.shape[2:])
            full[:, lo:hi] = qa
            acc = _conv_int_weighted(full, qw, w_scale, geometry, a_abs, w_abs)
        else:
            acc = _conv_int_weighted(qa, qw[:, lo:hi], w_scale, geometry, a_abs, w_abs)
        y = acc * sa.float() if y is None else y + acc * sa.float()
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


def explicit_padding(padding, kernel, dilation) -> tuple[int, int] | None:
    """(ph, pw) for tuple, 'valid' or 'same' padding; None for a 'same' that pads unevenly (even kernel)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [dilation[i] * (kernel[i] - 1) for i in range(2)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return (int(padding[0]), int(padding[1]))


def _conv_out_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple(
        math.floor((hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i] + 1) for i in range(2)
    )


__all__ = [
    "KernelPreference",
    "resolve_backend",
    "triton_available",
    "weight_sums",
    "linear_int",
    "conv2d_int",
    "conv2d_int_split",
    "int_gemm",
]
