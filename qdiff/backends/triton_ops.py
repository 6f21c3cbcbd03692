"""Triton implementations of :func:`qdiff.backends.ops.linear_int` / :func:`qdiff.backends.ops.conv2d_int`.

Imported lazily by :mod:`qdiff.backends.ops` (never at ``import qdiff``). Same numerics as the torch reference:
identical activation codes (correctly rounded division, ties to even), exact int32 accumulation, and the
reference's epilogue order, so the two paths agree bit for bit (tested through the interpreter).

Convolutions run as GEMMs on the *integer* activations: quantize the input once (per-sample dynamic or
static scale), pad with the zero-point (a padded pixel is real 0, i.e. code ``zp``), im2col the int8 codes
(a 1x1 stride-1 conv needs only a channels-last view), one GEMM with M = B*Ho*Wo and K = C*kh*kw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff._kernels.act_quant import quantize_dynamic, quantize_given
from qdiff._kernels.gemm_w4a8 import gemm_w4a8
from qdiff._kernels.gemm_w8a8 import gemm_w8a8
from qdiff.backends.ops import explicit_padding, weight_sums
from qdiff.numerics.primitives import compute_qparams, qrange


def _gemm(qa, qweight, w_scale, *, w_bits, k, group_size, bias, a_scale, a_zp, w_sum, out_dtype) -> Tensor:
    if a_zp is not None and w_sum is None:  # a caller without a cache: compute them here (one pass over W)
        w_sum = weight_sums(qweight, w_bits, k, group_size, w_scale.shape[1])
    kw = dict(bias=bias, a_zp=a_zp, w_sum=w_sum, group_size=group_size, out_dtype=out_dtype)
    if w_bits == 8:
        return gemm_w8a8(qa, qweight, a_scale, w_scale, **kw)
    return gemm_w4a8(qa, qweight, k, a_scale, w_scale, **kw)


def _out_dtype(x: Tensor) -> torch.dtype:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"quantized layers take fp16/bf16/fp32 inputs, got {x.dtype}")
    return x.dtype


def linear_int(x, qweight, w_scale, *, w_bits, in_features, group_size, bias, a_bits, a_mode, a_scale, a_zp, w_sum):
    """Triton twin of :func:`qdiff.backends.ops.linear_int` (same arguments; ``w_sum`` is the optional cache)."""
    out_dtype = _out_dtype(x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)  # (M, K), any float dtype: the kernel converts to fp32 like x.float()
    if a_mode == "dynamic":
        qa, sa = quantize_dynamic(x2d, a_bits)  # (M, K) int8, (M,) fp32
        zp = None
    else:
        qmin, qmax = qrange(a_bits, symmetric=False)
        qa, sa, zp = quantize_given(x2d, a_scale, a_zp, qmin, qmax), a_scale, a_zp
    y = _gemm(
        qa, qweight, w_scale, w_bits=w_bits, k=in_features, group_size=group_size, bias=bias,
        a_scale=sa, a_zp=zp, w_sum=w_sum, out_dtype=out_dtype,
    )  # fmt: skip
    return y.reshape(*lead, y.shape[-1])


def im2col_int8(q: Tensor, zp: Tensor | None, kernel, stride, padding, dilation) -> tuple[Tensor, int, int]:
    """int8 codes (B, C, H, W) -> (B*Ho*Wo, C*kh*kw) rows in the weight's (C, kh, kw) order, plus (Ho, Wo).

    Padded pixels get the code ``zp`` (real value 0); a 1x1 stride-1 unpadded conv is a channels-last view.
    """
    b, c, h, w = q.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return q.permute(0, 2, 3, 1).reshape(b * h * w, c), h, w
    if ph or pw:
        qp = F.pad(q, (pw, pw, ph, ph))
        if zp is not None:  # border := zp without reading zp on the host (no sync)
            border = torch.ones(1, 1, h, w, dtype=torch.bool, device=q.device)
            border = ~F.pad(border, (pw, pw, ph, ph))
            qp = torch.where(border, zp.reshape(()).to(torch.int8), qp)
        q = qp
    hp, wp = q.shape[-2:]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    q = q.contiguous()
    s_b, s_c, s_h, s_w = q.stride()
    cols = q.as_strided((b, ho, wo, c, kh, kw), (s_b, s_h * sh, s_w * sw, s_c, s_h * dh, s_w * dw))
    return cols.reshape(b * ho * wo, c * kh * kw), ho, wo


def conv2d_int(
    x, qweight, w_scale, *, w_bits, weight_shape, stride, padding, dilation, group_size, bias, a_bits, a_mode,
    a_scale, a_zp, w_sum,
) -> Tensor | None:  # fmt: skip
    """Triton twin of :func:`qdiff.backends.ops.conv2d_int`; returns None when the padding needs the torch path."""
    n, c, kh, kw = weight_shape
    pads = explicit_padding(padding, (kh, kw), dilation)
    if pads is None:
        return None
    out_dtype = _out_dtype(x)
    b = x.shape[0]
    x2d = x.reshape(b, -1)  # (B, C*H*W): one row per sample
    if a_mode == "dynamic":  # per-sample scale, computed exactly as the reference does
        amax = x2d.abs().amax(dim=1).float()
        sa = compute_qparams(-amax, amax, a_bits, symmetric=True)[0]  # (B,)
        qmax = qrange(a_bits, symmetric=True)[1]
        q2d, zp = quantize_given(x2d, sa, None, -qmax, qmax), None
    else:
        qmin, qmax = qrange(a_bits, symmetric=False)
        q2d, sa, zp = quantize_given(x2d, a_scale, a_zp, qmin, qmax), a_scale, a_zp
    cols, ho, wo = im2col_int8(q2d.reshape(x.shape), zp, (kh, kw), stride, pads, dilation)  # (B*Ho*Wo, K)
    row_scale = sa.reshape(-1).repeat_interleave(ho * wo) if a_mode == "dynamic" else sa
    y = _gemm(
        cols,
        qweight,
        w_scale,
        w_bits=w_bits,
        k=c * kh * kw,
        group_size=group_size,
        bias=bias,
        a_scale=row_scale,
        a_zp=zp,
        w_sum=w_sum,
        out_dtype=out_dtype,
    )  # fmt: skip  (B*Ho*Wo, N)
    return y.reshape(b, ho, wo, n).permute(0, 3, 1, 2).contiguous()
