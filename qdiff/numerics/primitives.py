"""Quantization math: the one source of truth for quantize / dequantize / fake-quant and bit packing.

Conventions
-----------
* Integer codes are stored as ``torch.int8`` (signed), whatever the bit-width.
* Symmetric quantization uses the restricted signed range ``[-(2**(b-1)-1), 2**(b-1)-1]`` and a zero-point of 0.
* Asymmetric quantization uses the full signed range ``[-2**(b-1), 2**(b-1)-1]`` with an integer zero-point, so
  ``x ~= scale * (q - zero_point)`` and activations can feed an int8 GEMM directly.
* All arithmetic is float32 regardless of the input dtype; ``round`` is ``torch.round`` (half to even).
* Weights are always viewed as 2-D ``(N, K)``: Linear ``(out, in)``, Conv2d ``(out, in*kh*kw)`` via ``w.flatten(1)``.
* Packed int4 / int2 weights are ``torch.uint8`` with two's-complement fields, element ``k`` of a row at the low end.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

from qdiff.config.bits import WEIGHT_BITS

__all__ = [
    "SUPPORTED_BITS",
    "Granularity",
    "check_bits",
    "qrange",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "weight_minmax",
    "expand_group_param",
    "quantize_weight",
    "dequantize_weight",
    "token_qparams",
    "storage_bits",
    "packed_width",
    "num_groups",
    "pack_int4",
    "unpack_int4",
    "pack_int2",
    "unpack_int2",
    "pack_weight",
    "unpack_weight",
]

SUPPORTED_BITS: tuple[int, ...] = WEIGHT_BITS

Granularity = Literal["tensor", "channel", "group"]
_GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")


# --------------------------------------------------------------------------------------------------------------------
# ranges and quantization parameters
# --------------------------------------------------------------------------------------------------------------------


def check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is one of :data:`SUPPORTED_BITS`."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)``: restricted signed range if symmetric, full signed range otherwise."""
    check_bits(bits)
    b = int(bits)
    qmax = 2 ** (b - 1) - 1
    return (-qmax, qmax) if symmetric else (-(2 ** (b - 1)), qmax)


def compute_qparams(
    min_val: Tensor, max_val: Tensor, bits: int, symmetric: bool, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Scale / zero-point from a range.

    ``min_val``, ``max_val``: broadcastable tensors of any shape ``S``; returns ``(scale float32 S, zp int32 S)``.
    Symmetric: ``scale = max(|min|, |max|) / qmax`` and ``zp = 0``. Asymmetric: the range is widened to include 0,
    ``scale = (max - min) / (qmax - qmin)`` and ``zp = clamp(qmin - round(min / scale), qmin, qmax)`` so that 0.0 is
    represented exactly. ``scale`` is clamped below by ``eps``; all math in float32.
    """
    qmin, qmax = qrange(bits, symmetric)
    mn, mx = torch.broadcast_tensors(min_val.detach().float(), max_val.detach().float())
    if symmetric:
        # divide by a same-device tensor, not a Python number: CUDA torch turns division by a scalar into a
        # multiply by its reciprocal (1 ulp off at times), which would make CPU, CUDA and the Triton kernels differ
        scale = (torch.maximum(mn.abs(), mx.abs()) / torch.full_like(mn, float(qmax))).clamp_min(eps)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    mn = mn.clamp_max(0.0)
    mx = mx.clamp_min(0.0)
    scale = ((mx - mn) / torch.full_like(mn, float(qmax - qmin))).clamp_min(eps)
    zero_point = (qmin - torch.round(mn / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


# --------------------------------------------------------------------------------------------------------------------
# quantize / dequantize / fake-quant
# --------------------------------------------------------------------------------------------------------------------


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` as ``torch.int8``, same shape as ``x``.

    ``scale`` (float) and ``zero_point`` (int, or ``None`` for 0) broadcast against ``x``. Computed in float32.
    """
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(x.detach().float() / scale.detach().float())
    if zero_point is not None:
        q = q + zero_point.detach().float()
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """``(q - zero_point) * scale`` in float32; ``scale`` / ``zero_point`` broadcast against ``q``."""
    v = q.float()
    if zero_point is not None:
        v = v - zero_point.float()
    return v * scale.float()


class _StraightThrough(torch.autograd.Function):
    """Forward returns the precomputed fake-quantized value; backward passes the gradient to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, xq: Tensor) -> Tensor:  # type: ignore[override]
        return xq

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype with a straight-through gradient (d out / d x = identity).

    The value is bitwise equal to ``dequantize(quantize(x, ...), ...).to(x.dtype)`` (a custom autograd function is
    used rather than ``x + (xq - x).detach()``, whose float rounding would not always give exactly ``xq``).
    """
    xq = dequantize(quantize(x, scale, zero_point, bits, symmetric), scale, zero_point).to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, xq)
    return xq


# --------------------------------------------------------------------------------------------------------------------
# weight granularity helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_2d(w2d: Tensor, name: str = "w2d") -> None:
    if w2d.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(w2d.shape)}")


def _check_group_size(group_size: int | None) -> int:
    if group_size is None or isinstance(group_size, bool) or int(group_size) <= 0:
        raise ValueError(f"group granularity needs a positive group_size, got {group_size}")
    return int(group_size)


def num_groups(K: int, group_size: int) -> int:
    """Number of weight groups along K: ``ceil(K / group_size)`` (the last one may be ragged)."""
    return math.ceil(K / group_size)


def weight_minmax(w2d: Tensor, granularity: Granularity, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-tensor / per-channel / per-group min and max of a 2-D weight ``(N, K)``, float32.

    Shapes: tensor ``(1, 1)``; channel ``(N, 1)``; group ``(N, G)`` with ``G = ceil(K / group_size)``. A ragged last
    group (``K % group_size != 0``) is reduced over its real elements only.
    """
    _check_2d(w2d)
    w = w2d.detach().float()
    if granularity == "tensor":
        mn, mx = torch.aminmax(w)
        return mn.reshape(1, 1), mx.reshape(1, 1)
    if granularity == "channel":
        mn, mx = torch.aminmax(w, dim=1, keepdim=True)
        return mn, mx
    if granularity == "group":
        gs = _check_group_size(group_size)
        N, K = w.shape
        G = num_groups(K, gs)
        pad = G * gs - K
        if pad:  # replicate the last real element: it belongs to the ragged group, so its min/max are unchanged
            w = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1)
        mn, mx = torch.aminmax(w.reshape(N, G, gs), dim=2)
        return mn, mx
    raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")


def expand_group_param(p: Tensor, K: int, group_size: int | None) -> Tensor:
    """Expand a per-group parameter ``(N, G)`` to ``(N, K)``; ``(N, 1)`` / ``(1, 1)`` are returned unchanged."""
    _check_2d(p, "p")
    if p.shape[1] == 1:
        return p
    gs = _check_group_size(group_size)
    if p.shape[1] != num_groups(K, gs):
        raise ValueError(f"expected {num_groups(K, gs)} groups for K={K}, group_size={gs}; got {p.shape[1]}")
    return p.repeat_interleave(gs, dim=1)[:, :K]


def quantize_weight(w2d: Tensor, scale: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """Symmetric weight quantization (zero-point 0). ``w2d`` (N, K), ``scale`` (1,1)/(N,1)/(N,G) -> int8 (N, K)."""
    _check_2d(w2d)
    s = expand_group_param(scale, w2d.shape[1], group_size)
    return quantize(w2d, s, None, bits, symmetric=True)


def dequantize_weight(q2d: Tensor, scale: Tensor, group_size: int | None = None) -> Tensor:
    """Inverse of :func:`quantize_weight`: int8 ``(N, K)`` -> float32 ``(N, K)``."""
    _check_2d(q2d, "q2d")
    return dequantize(q2d, expand_group_param(scale, q2d.shape[1], group_size), None)


def token_qparams(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token (per row over the last dim) absmax qparams.

    ``x`` (..., D) -> ``(scale float32 (..., 1), zero_point int32 zeros (..., 1))``.
    """
    absmax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return compute_qparams(-absmax, absmax, bits, symmetric=True)


# --------------------------------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------------------------------


def storage_bits(bits: int) -> int:
    """Bits per stored element: 8 -> 8, 4 -> 4, 3 -> 4 (nibbles), 2 -> 2."""
    check_bits(bits)
    return {8: 8, 4: 4, 3: 4, 2: 2}[int(bits)]


def packed_width(K: int, bits: int) -> int:
    """Stored columns of a row of ``K`` codes: ``K`` int8 for 8-bit, else ``ceil(K * storage_bits / 8)`` uint8."""
    return _packed_len(K, storage_bits(bits))


def _packed_len(K: int, field_bits: int) -> int:
    return math.ceil(K / (8 // field_bits))


def _check_codes(q: Tensor, lo: int, hi: int) -> None:
    if q.dtype != torch.int8:
        raise TypeError(f"expected int8 codes, got {q.dtype}")
    if q.dim() < 1:
        raise ValueError("expected codes with at least one dimension (..., K)")
    if q.numel():
        mn, mx = torch.aminmax(q)
        if int(mn) < lo or int(mx) > hi:
            raise ValueError(f"codes must lie in [{lo}, {hi}], got [{int(mn)}, {int(mx)}]")


def _pack(q: Tensor, field_bits: int) -> Tensor:
    """Pack int8 codes ``(..., K)`` into uint8 ``(..., ceil(K / per))``, element ``k = per*j + i`` in field ``i``."""
    per = 8 // field_bits
    mask = (1 << field_bits) - 1
    K = q.shape[-1]
    nbytes = _packed_len(K, field_bits)
    u = (q & mask).to(torch.uint8)  # two's-complement field of each code
    pad = nbytes * per - K
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*q.shape[:-1], nbytes, per)
    out = u[..., 0].clone()
    for i in range(1, per):  # loop over the (<= 4) fields of a byte, not over elements
        out |= u[..., i] << (field_bits * i)
    return out


def _unpack(p: Tensor, K: int, field_bits: int) -> Tensor:
    """Inverse of :func:`_pack`: uint8 ``(..., B)`` -> sign-extended int8 ``(..., K)``."""
    if p.dtype != torch.uint8:
        raise TypeError(f"expected uint8 packed data, got {p.dtype}")
    per = 8 // field_bits
    if p.dim() < 1 or p.shape[-1] != _packed_len(K, field_bits):
        raise ValueError(f"packed last dim must be ceil(K / {per}) = {_packed_len(K, field_bits)} for K={K}")
    mask = (1 << field_bits) - 1
    sign = 1 << (field_bits - 1)
    fields = [((p >> (field_bits * i)) & mask) for i in range(per)]
    u = torch.stack(fields, dim=-1).reshape(*p.shape[:-1], p.shape[-1] * per)[..., :K]
    return ((u.to(torch.int8) ^ sign) - sign).to(torch.int8)  # sign-extend the two's-complement field


def pack_int4(q: Tensor) -> Tensor:
    """int8 ``(N, K)`` in [-8, 7] -> uint8 ``(N, ceil(K/2))``: ``k = 2j`` in the low nibble of byte j, ``2j+1`` high.

    Odd ``K`` is padded with 0. Leading dims other than ``N`` are also accepted (packing is along the last dim).
    """
    _check_codes(q, -8, 7)
    return _pack(q, 4)


def unpack_int4(p: Tensor, K: int) -> Tensor:
    """Exact inverse of :func:`pack_int4`: uint8 ``(N, ceil(K/2))`` -> int8 ``(N, K)``."""
    return _unpack(p, K, 4)


def pack_int2(q: Tensor) -> Tensor:
    """int8 ``(N, K)`` in [-2, 1] -> uint8 ``(N, ceil(K/4))``: element ``k = 4j + i`` in bits 2i..2i+1 of byte j."""
    _check_codes(q, -2, 1)
    return _pack(q, 2)


def unpack_int2(p: Tensor, K: int) -> Tensor:
    """Exact inverse of :func:`pack_int2`: uint8 ``(N, ceil(K/4))`` -> int8 ``(N, K)``."""
    return _unpack(p, K, 2)


def pack_weight(q: Tensor, bits: int) -> Tensor:
    """Storage form of int8 codes ``(N, K)``: 8 -> ``q`` (contiguous int8); 4, 3 -> :func:`pack_int4`; 2 -> int2."""
    check_bits(bits)
    b = int(bits)
    _check_codes(q, -(2 ** (b - 1)), 2 ** (b - 1) - 1)
    if b == 8:
        return q.contiguous()
    return pack_int4(q) if storage_bits(b) == 4 else pack_int2(q)


def unpack_weight(p: Tensor, bits: int, K: int) -> Tensor:
    """Inverse of :func:`pack_weight` -> int8 ``(N, K)``."""
    check_bits(bits)
    b = int(bits)
    if b == 8:
        if p.dtype != torch.int8 or p.shape[-1] != K:
            raise ValueError(f"8-bit storage must be int8 (..., {K}), got {p.dtype} {tuple(p.shape)}")
        return p
    return unpack_int4(p, K) if storage_bits(b) == 4 else unpack_int2(p, K)
