"""The exact torch reference for frozen layers: every call runs here when no faster backend covers it.

Activations are quantized with the same primitives as the fake-quant path, the integer products are accumulated
exactly (float32 GEMMs / convs over K chunks whose worst-case sum stays below 2**24, so every partial sum is an exact
integer whatever the summation order, the chunks added in float64; always float64 on CUDA, where cuBLAS/cuDNN may use
TF32), then the scales are applied in an fp32 epilogue in a fixed order: ``sum_g f32(acc_g) * w_scale_g``,
``* a_scale``, ``+ bias``, cast. The kernels are pinned to it bit for bit. The operands are never widened to float64
on the CPU (an SDXL 1280 x 23040 conv weight would be a 0.22 GiB temporary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.backends.acts import ActSpec, ConvGeometry, sample_scale, token_scale
from qdiff.errors import QdiffError
from qdiff.numerics.packed import PackedWeight
from qdiff.numerics.primitives import qrange, quantize

_FP32_EXACT = 2**24


class ReferenceBackend:
    """Exact integer math in torch on any device; supports every op and scheme (the fallback)."""

    name = "torch"

    def device_error(self, device: torch.device, requested: bool) -> str | None:
        return None

    def supports(self, op: str, x: Tensor, pw: PackedWeight, act: ActSpec, geom: ConvGeometry | None) -> bool:
        return True

    def linear(self, x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None) -> Tensor:
        return linear(x, pw, act, bias)

    def conv2d(self, x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
        return conv2d(x, pw, act, bias, geom)


def linear(x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None) -> Tensor:
    """y = x @ W^T + b: x (..., K) -> (..., N) in x's dtype."""
    out_dtype = x.dtype
    qw = pw.unpack()  # (N, K) int8
    if act.bits is None:  # weight-only (W*A16)
        w = pw.dequantize().to(out_dtype)
        return F.linear(x, w, None if bias is None else bias.to(out_dtype))
    lead = x.shape[:-1]
    qa, sa = quantize_tokens(x.reshape(-1, pw.k).float(), act)  # (M, K), (M,1)|(1,1)
    a_abs, w_abs = act_abs_max(act), qrange(pw.bits, True)[1]
    if not pw.grouped:
        y = int_gemm(qa, qw, a_abs, w_abs).float() * pw.scale.reshape(1, -1).float()  # (M, N)
    else:  # group-wise: each group's exact integer sum gets its own scale
        y = grouped_gemm(qa, qw, pw, a_abs, w_abs)
    y = y * sa.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, pw.n)


def conv2d(x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """Frozen groups=1 Conv2d, x (B, C, H, W). Padding happens on ``q - zp`` so padded pixels are exact zeros.

    With ``act.split`` the channels ``[0, split)`` and ``[split, C)`` are quantized separately (Q-Diffusion's
    shortcut splitting, Li et al., ICCV 2023): ``y = s1 * conv(q1, W[:, :split]) + s2 * conv(q2, W[:, split:]) + b``.
    """
    out_dtype = x.dtype
    n, c = geom.weight_shape[:2]
    qw = pw.unpack().reshape(geom.weight_shape)  # (N, C, kh, kw) int8
    if act.bits is None:
        w = pw.dequantize().reshape(geom.weight_shape).to(out_dtype)
        b = None if bias is None else bias.to(out_dtype)
        return F.conv2d(x, w, b, stride=geom.stride, padding=geom.padding, dilation=geom.dilation)
    a_abs, w_abs = act_abs_max(act), qrange(pw.bits, True)[1]
    if act.split is None:
        qa, sa = quantize_sample(x, act)
        y = _conv_weighted(qa, qw, pw, geom, a_abs, w_abs) * sa.float()
    else:
        y = None
        for i, (lo, hi) in enumerate(((0, act.split), (act.split, c))):
            qa, sa = quantize_sample(x[:, lo:hi], act.part(i))  # (B, hi-lo, H, W)
            if pw.grouped:  # a weight group may straddle the split: zero the other part's channels, do not slice
                full = qa.new_zeros(qa.shape[0], c, *qa.shape[2:])
                full[:, lo:hi] = qa
                acc = _conv_weighted(full, qw, pw, geom, a_abs, w_abs)
            else:
                acc = _conv_weighted(qa, qw[:, lo:hi], pw, geom, a_abs, w_abs)
            y = acc * sa.float() if y is None else y + acc * sa.float()
    if bias is not None:
        y = y + bias.float().reshape(1, n, 1, 1)
    return y.to(out_dtype)


# ---- activations ---------------------------------------------------------------------------------------------------
def quantize_tokens(x2d: Tensor, act: ActSpec) -> tuple[Tensor, Tensor]:
    """(M, K) -> (q - zp as exact integers in float32 (M, K), scale (M,1) dynamic per token or (1,1) static)."""
    if not act.static:
        scale = token_scale(x2d, act.bits)
        return quantize(x2d, scale, None, act.bits, symmetric=True).float(), scale
    q = quantize(x2d, act.scale, act.zp, act.bits, symmetric=False)
    return q.float() - act.zp.float(), act.scale.reshape(1, 1)


def quantize_sample(x: Tensor, act: ActSpec) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> (q - zp exact in float32, scale (B,1,1,1) dynamic per sample or (1,1,1,1) static)."""
    xf = x.float()
    if not act.static:
        scale = sample_scale(x, act.bits)
        return quantize(xf, scale, None, act.bits, symmetric=True).float(), scale
    q = quantize(xf, act.scale, act.zp, act.bits, symmetric=False)
    return q.float() - act.zp.float(), act.scale.reshape(1, 1, 1, 1)


def act_abs_max(act: ActSpec) -> int:
    """Largest |q - zp| of the activation codes (asymmetric: qmax - qmin)."""
    lo, hi = qrange(act.bits, symmetric=not act.static)
    return hi - lo if act.static else hi


# ---- exact integer products ----------------------------------------------------------------------------------------
def exact_chunk(a_abs: int, w_abs: int) -> int:
    """The largest K whose worst-case integer dot product ``K * |a| * |w|`` stays below 2**24 (exact in float32)."""
    return max(1, (_FP32_EXACT - 1) // (a_abs * w_abs))


def _exact_product(op, qa: Tensor, qw: Tensor, size: int, chunk: int) -> Tensor:
    """``op(qa, qw)`` over dim 1 (K of a GEMM, input channels of a conv) as exact integers: float32 when ``size``
    fits one ``chunk``, else float32 products of chunks added in float64 (exact below 2**53). float64 on CUDA."""
    if qa.device.type == "cuda":
        return op(qa.double(), qw.double())
    if size <= chunk:
        return op(qa.float(), qw.float())
    acc = None
    for lo in range(0, size, chunk):
        part = op(qa[:, lo : lo + chunk].float(), qw[:, lo : lo + chunk].float()).double()
        acc = part if acc is None else acc.add_(part)
    return acc  # type: ignore[return-value]


def int_gemm(qa: Tensor, qw: Tensor, a_abs: int, w_abs: int) -> Tensor:
    """Exact integer GEMM: (M, K) x (N, K)^T -> (M, N) integer values (float32 or float64, see above)."""
    return _exact_product(lambda a, w: a @ w.t(), qa, qw, qa.shape[-1], exact_chunk(a_abs, w_abs))


def int_conv2d(qa: Tensor, qw: Tensor, geom: ConvGeometry, a_abs: int, w_abs: int) -> Tensor:
    """Exact integer conv of ``qa`` (B, C, H, W) with codes ``qw`` (N, C, kh, kw): integer values in float32 when
    ``C * kh * kw`` fits one exact chunk, else float64 (float32 convs over input-channel chunks, added in float64)."""

    def conv(a: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(a, w, stride=geom.stride, padding=geom.padding, dilation=geom.dilation)

    per = max(1, exact_chunk(a_abs, w_abs) // (qw.shape[2] * qw.shape[3]))  # input channels per exact chunk
    return _exact_product(conv, qa, qw, qw.shape[1], per)


def grouped_gemm(qa: Tensor, qw: Tensor, pw: PackedWeight, a_abs: int, w_abs: int) -> Tensor:
    """Group-wise sum of exact integer GEMMs: (M, K) x (N, K) -> (M, N) fp32; the activation scale is not applied."""
    k, gs = qa.shape[1], int(pw.group_size)  # type: ignore[arg-type]
    y = qa.new_zeros(qa.shape[0], qw.shape[0], dtype=torch.float32)
    for g in range(pw.num_groups):
        sl = slice(g * gs, min((g + 1) * gs, k))
        y += int_gemm(qa[:, sl], qw[:, sl], a_abs, w_abs).float() * pw.scale[:, g].reshape(1, -1).float()
    return y


def _conv_weighted(qa: Tensor, qw: Tensor, pw: PackedWeight, geom: ConvGeometry, a_abs: int, w_abs: int) -> Tensor:
    """Exact integer conv of ``qa`` (B, C', H, W) with codes ``qw`` (N, C', kh, kw), times the weight scales (fp32).

    C' may be a slice of the input channels (a split part with per-channel scales); the activation scale is not
    applied.
    """
    n, c, kh, kw = qw.shape
    k = c * kh * kw
    if not pw.grouped:
        acc = int_conv2d(qa, qw, geom, a_abs, w_abs)
        return acc.float() * pw.scale.reshape(1, -1, 1, 1).float()  # (N,1) per channel or (1,1) per tensor
    # group-wise weights: im2col, then one exact integer GEMM per group
    padding = geom.explicit_padding()
    if padding is None:
        raise QdiffError("padding='same' with an even kernel is not supported for quantized group-wise Conv2d")
    cols = F.unfold(qa, (kh, kw), dilation=geom.dilation, padding=padding, stride=geom.stride)  # (B, K, L)
    b, _, length = cols.shape
    out_h, out_w = geom.out_hw(tuple(qa.shape[-2:]), padding)
    y2d = grouped_gemm(cols.transpose(1, 2).reshape(-1, k), qw.reshape(n, k), pw, a_abs, w_abs)  # (B*L, N)
    # contiguous NCHW like F.conv2d's output (a channels-last view would change downstream float rounding)
    return y2d.reshape(b, length, n).transpose(1, 2).reshape(b, n, out_h, out_w).contiguous()
