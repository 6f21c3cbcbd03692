"""Exact int8 CPU execution of frozen W8A8 / W4A8 layers (oneDNN VNNI kernels reached through torch ops).

Every function returns a tensor *equal* (``torch.equal``) to :mod:`qdiff.backends.reference` (``linear``,
``conv2d``, split activations included) for the same codes, scales and activation quantizer: activations are
quantized with the same math (:mod:`qdiff.backends.int8_acts`), the integer products are accumulated exactly in
int32 (:mod:`qdiff.backends.onednn`), and the fp32 epilogue keeps the reference order ``acc.float() * w_scale``,
``* a_scale``, ``+ bias``, ``.to(x.dtype)`` (group-wise: ``y = 0; y += acc_g.float() * s_g`` in group order).

* Linear: oneDNN's int8 GEMM on a prepacked weight (group-wise: one call per K group, accumulated in place).
* Conv2d with per-channel / per-tensor weight scales: oneDNN's direct int8 conv on channels-last uint8 codes
  (an uneven 'same' padding is padded with the zero-point code beforehand), fp32 epilogue in place, one transposed
  copy back to contiguous NCHW (downstream float ops keep the reference's rounding). im2col + ``_int_mm`` measured
  3.5x slower than oneDNN's direct conv here.
* Group-wise Conv2d (W4A8): uint8 im2col (:func:`qdiff.backends.int8_acts.im2col_u8`) and the group-wise GEMM.

These kernels are only exact where the CPU has VNNI (or AMX); :func:`qdiff.backends.int8_gate.self_test` detects
that, and :class:`CpuInt8Backend` runs it once per process through the registry before it is chosen. The backend
keeps each layer's prepacked weight in the layer's own slot (:mod:`qdiff.backends.prepacked`), where it becomes the
layer's one resident copy of the weight. The functions below take a prepacked weight (``packed``) or prepack the
codes they are given on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiff.backends.int8_acts import im2col_u8, quantize_act, to_channels_last, to_nchw
from qdiff.backends.int8_gate import GATE_K, self_test
from qdiff.backends.onednn import (
    PackedConv,
    PackedLinear,
    int8_gemm,
    onednn_available,
    packed_matmul,
    prepack_conv,
    prepack_linear,
    qconv,
)
from qdiff.backends.prepacked import held
from qdiff.numerics.primitives import unpack_weight

__all__ = [
    "CpuInt8Backend",
    "PackedLinear",
    "PackedConv",
    "onednn_available",
    "int8_gemm",
    "quantize_act",
    "prepack_linear",
    "prepack_conv",
    "linear_w8a8",
    "linear_w4a8",
    "linear_packed",
    "conv2d_w8a8",
    "conv2d_w8a8_split",
    "conv2d_grouped",
    "self_test",
    "prepacked_nbytes",
]


# --------------------------------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------------------------------


def linear_packed(
    x: Tensor,
    pl: PackedLinear,
    bias: Tensor | None = None,
    *,
    a_bits: int = 8,
    a_mode: str = "dynamic",
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
) -> Tensor:
    """``y = x @ W^T + b`` for a prepacked weight: x (..., K) fp32/bf16/fp16 -> (..., N) in x's dtype.

    Equal to :func:`qdiff.backends.reference.linear` for the same codes, scales and activation quantizer.
    """
    lead = x.shape[:-1]
    qa, zp, sa = quantize_act(x.reshape(-1, pl.k), a_bits, a_mode, a_scale, a_zp)
    y = packed_matmul(pl, qa, zp)
    y.mul_(sa)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*lead, pl.n)


def linear_w8a8(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    a_bits: int = 8,
    a_mode: str = "dynamic",
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
    packed: PackedLinear | None = None,
) -> Tensor:
    """W8A8 Linear: x (..., K), int8 ``qweight`` (N, K), ``w_scale`` (N, 1) / (1, 1) -> (..., N) in x's dtype.

    ``a_mode``: ``dynamic`` (symmetric per token) or ``static`` (per-tensor ``a_scale``, ``a_zp``). Equal to the
    reference ``linear`` of an 8-bit per-channel / per-tensor weight. ``packed`` defaults to
    :func:`prepack_linear` of ``qweight`` (made on every call).
    """
    if packed is None:
        packed = prepack_linear(qweight, w_scale)
    return linear_packed(x, packed, bias, a_bits=a_bits, a_mode=a_mode, a_scale=a_scale, a_zp=a_zp)


def linear_w4a8(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    group_size: int,
    bias: Tensor | None = None,
    *,
    in_features: int,
    w_bits: int = 4,
    a_bits: int = 8,
    a_mode: str = "dynamic",
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
    packed: PackedLinear | None = None,
) -> Tensor:
    """Group-wise W4A8 Linear: ``qweight`` packed int4 uint8 (N, ceil(K/2)) or int8 codes (N, K), scales (N, G).

    Equal to the reference ``linear`` of that group-wise weight; the last group may be ragged. The prepacked weight
    (``packed``, else made on every call) keeps the codes unpacked (one byte each), which
    ``scripts/bench_cpu_int8.py`` measured against unpacking per call.
    """
    if packed is None:
        codes = qweight if qweight.dtype == torch.int8 else unpack_weight(qweight, w_bits, in_features)
        packed = prepack_linear(codes, w_scale, group_size)
    return linear_packed(x, packed, bias, a_bits=a_bits, a_mode=a_mode, a_scale=a_scale, a_zp=a_zp)


# --------------------------------------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------------------------------------


def _part(t: Tensor | None, i: int) -> Tensor | None:
    """Split part ``i``'s static activation scale / zero-point from a (2,) tensor (None stays None)."""
    return None if t is None else t.reshape(2)[i]


def _finish_conv(y: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``(y + bias).to(dtype)`` as a contiguous NCHW tensor (``y`` fp32 channels-last, modified in place)."""
    if bias is not None:
        y.add_(bias.float().reshape(1, -1, 1, 1))
    return to_nchw(y.to(dtype))


def _conv_pads(padding, weight_shape, dilation) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of pair, 'valid' or 'same' padding ('same': the extra pixel bottom/right)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total = [dilation[i] * (weight_shape[2 + i] - 1) for i in range(2)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    return (int(padding[0]), int(padding[0]), int(padding[1]), int(padding[1]))


def _conv_geometry(padding, weight_shape, dilation) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """(symmetric padding oneDNN applies, explicit (left, right, top, bottom) zero-point pad or None)."""
    top, bottom, left, right = _conv_pads(padding, weight_shape, dilation)
    if top == bottom and left == right:
        return (top, left), None
    return (0, 0), (left, right, top, bottom)


def _conv_codes_padded(x: Tensor, act: tuple, extra_pad: tuple[int, int, int, int] | None):
    """:func:`quantize_act` in channels-last uint8, an uneven padding filled with the zero-point code (real 0)."""
    qx, zp, sa = quantize_act(x, *act)
    if extra_pad is not None:
        qx = torch.nn.functional.pad(qx, extra_pad, value=zp)
    return to_channels_last(qx), zp, sa


def _packed_conv(qweight, w_scale, weight_shape, lo, hi, stride, pad, dilation, x_shape=None) -> PackedConv:
    """:class:`PackedConv` of input channels [lo, hi) of the weight (all of them: lo=0, hi=C)."""
    n, _, kh, kw = weight_shape
    shape = (n, hi - lo, kh, kw)
    return prepack_conv(qweight.reshape(weight_shape)[:, lo:hi], w_scale, shape, stride, pad, dilation, x_shape)


def conv2d_w8a8(
    x: Tensor,
    qweight: Tensor | None,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    a_bits: int = 8,
    a_mode: str = "dynamic",
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
    packed: PackedConv | None = None,
) -> Tensor:
    """W8A8 Conv2d (groups=1): x (B, C, H, W), int8 ``qweight`` (N, C*kh*kw) (None with ``packed``), scales (N, 1).

    Returns contiguous NCHW (B, N, Ho, Wo) in x's dtype, equal to the reference ``conv2d`` for 8-bit (or any
    unpacked int8 codes) per-channel / per-tensor weights. Needs oneDNN ops (:func:`onednn_available`). ``packed``
    defaults to :func:`prepack_conv` of ``qweight`` (made on every call).
    """
    pad, extra = _conv_geometry(padding, weight_shape, dilation)
    if packed is None:
        packed = _packed_conv(qweight, w_scale, weight_shape, 0, weight_shape[1], stride, pad, dilation, x.shape)
    qx, zp, sa = _conv_codes_padded(x, (a_bits, a_mode, a_scale, a_zp), extra)
    return _finish_conv(qconv(qx, zp, packed).mul_(sa), bias, x.dtype)


def conv2d_w8a8_split(
    x: Tensor,
    qweight: Tensor | None,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    split: int,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    a_bits: int = 8,
    a_mode: str = "dynamic",
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
    packed: tuple[PackedConv, PackedConv] | None = None,
) -> Tensor:
    """Split-skip W8A8 Conv2d: input channels [0, split) and [split, C) quantized separately.

    Static ``a_scale`` / ``a_zp`` have shape (2,), one per part. ``y = (acc_1 * s_w) * s_1 + (acc_2 * s_w) * s_2
    + b``, equal to the reference ``conv2d`` with a split activation spec (non-grouped weights); ``packed``: the
    two parts' weights (input channels [0, split) and [split, C)), else prepacked from ``qweight`` on every call.
    """
    pad, extra = _conv_geometry(padding, weight_shape, dilation)
    parts = ((0, split), (split, weight_shape[1]))
    if packed is None:
        packed = tuple(
            _packed_conv(
                qweight, w_scale, weight_shape, lo, hi, stride, pad, dilation, (x.shape[0], hi - lo, *x.shape[2:])
            )
            for lo, hi in parts
        )
    y = None
    for part, (lo, hi) in enumerate(parts):
        scale, zp = _part(a_scale, part), _part(a_zp, part)
        qx, zpu, sa = _conv_codes_padded(x[:, lo:hi], (a_bits, a_mode, scale, zp), extra)
        t = qconv(qx, zpu, packed[part]).mul_(sa)
        y = t if y is None else y.add_(t)
    return _finish_conv(y, bias, x.dtype)


def conv2d_grouped(
    x: Tensor,
    packed: PackedLinear,
    bias: Tensor | None = None,
    *,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    a_bits: int = 8,
    a_mode: str = "dynamic",
    a_scale: Tensor | None = None,
    a_zp: Tensor | None = None,
    split: int | None = None,
) -> Tensor:
    """Conv2d with group-wise weight scales: x (B, C, H, W), ``packed`` the (N, C*kh*kw) codes in K groups.

    Equal to the reference's im2col + group-wise GEMM: ``sum_g float(acc_g) * s_g``, ``* a_scale``, ``+ bias``.
    ``pads``: (top, bottom, left, right). With ``split`` the channels [0, split) and [split, C) are quantized
    separately (static ``a_scale`` / ``a_zp`` of shape (2,)); as in the reference each part runs the whole GEMM with
    the other part's channels at its zero-point (a weight group may straddle the split). Returns contiguous NCHW.
    """
    b, c = x.shape[:2]
    n, _, kh, kw = weight_shape
    parts = ((0, c),) if split is None else ((0, split), (split, c))
    y, ho, wo = None, 0, 0
    for i, (lo, hi) in enumerate(parts):
        scale, zp = (a_scale, a_zp) if split is None else (_part(a_scale, i), _part(a_zp, i))
        qx, zpu, sa = quantize_act(x if split is None else x[:, lo:hi], a_bits, a_mode, scale, zp)
        if split is not None:
            full = torch.full((b, c, *x.shape[2:]), zpu, dtype=torch.uint8)
            full[:, lo:hi] = qx
            qx = full
        cols, ho, wo = im2col_u8(qx, (kh, kw), stride, pads, dilation, zpu)
        t = packed_matmul(packed, cols, zpu).view(b, ho * wo, n).mul_(sa.reshape(-1, 1, 1))
        y = t if y is None else y.add_(t)
    return _finish_conv(y.view(b, ho, wo, n).permute(0, 3, 1, 2), bias, x.dtype)  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------------------------
# backend adapter (qdiff.backends.registry protocol)
# --------------------------------------------------------------------------------------------------------------------


class CpuInt8Backend:
    """Exact int8 kernels on CPUs with VNNI: Linear with any weight codes (W8A8, group-wise W4A8/W3A8, ...) and
    groups=1 Conv2d with per-channel / per-tensor weight scales (split activations included).

    Group-wise Conv2d weights run through :func:`conv2d_grouped` (uint8 im2col + the group-wise GEMM). Not covered
    (the reference runs them): weight-only layers, non-CPU tensors.
    Unavailable (self-test fails) without oneDNN's quantized ops or without exact int8 kernels (no VNNI).
    The prepacked weights live in the calling layer's ``PackedWeight.slot`` (:func:`qdiff.backends.prepacked.held`),
    where they become the layer's one copy of its codes.
    """

    name = "cpu_int8"

    def self_test(self) -> tuple[bool, str]:
        if not onednn_available():
            return False, "this torch has no oneDNN quantized ops (torch.ops.onednn.qlinear_pointwise)"
        return self_test(GATE_K)

    def device_error(self, device: torch.device, requested: bool) -> str | None:
        return None if device.type == "cpu" else f"kernel 'cpu_int8' runs on CPU tensors, got one on {device.type}"

    def supports(self, op: str, x: Tensor, pw, act, geom) -> bool:
        if act.bits is None or x.device.type != "cpu" or pw.device.type != "cpu":
            return False
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        return op == "linear" or not pw.grouped or geom.explicit_padding() is not None  # as the reference

    @staticmethod
    def _packed_linear(pw) -> PackedLinear:
        group_size = pw.group_size if pw.grouped else None
        key = ("linear", pw.bits, pw.k, group_size)
        return held(pw, key, lambda: prepack_linear(pw.unpack(), pw.scale, group_size))  # type: ignore[return-value]

    def linear(self, x: Tensor, pw, act, bias: Tensor | None) -> Tensor:
        packed = self._packed_linear(pw)
        return linear_packed(x, packed, bias, a_bits=act.bits, a_mode=act.mode, a_scale=act.scale, a_zp=act.zp)

    def conv2d(self, x: Tensor, pw, act, bias: Tensor | None, geom) -> Tensor:
        shape, stride, dilation = tuple(geom.weight_shape), tuple(geom.stride), tuple(geom.dilation)
        if pw.grouped:
            ph, pwd = geom.explicit_padding()
            return conv2d_grouped(
                x, self._packed_linear(pw), bias, weight_shape=shape, stride=stride, pads=(ph, ph, pwd, pwd),
                dilation=dilation, a_bits=act.bits, a_mode=act.mode, a_scale=act.scale, a_zp=act.zp, split=act.split,
            )  # fmt: skip
        pad = _conv_geometry(geom.padding, shape, dilation)[0]
        kw = {"weight_shape": shape, "stride": stride, "padding": geom.padding, "dilation": dilation}
        act_kw = {"a_bits": act.bits, "a_mode": act.mode, "a_scale": act.scale, "a_zp": act.zp}
        parts = ((0, shape[1]),) if act.split is None else ((0, act.split), (act.split, shape[1]))

        def build() -> tuple[PackedConv, ...]:
            codes = pw.unpack()
            hint = lambda lo, hi: (x.shape[0], hi - lo, *x.shape[2:])  # noqa: E731
            return tuple(
                _packed_conv(codes, pw.scale, shape, lo, hi, stride, pad, dilation, hint(lo, hi)) for lo, hi in parts
            )

        packed = held(pw, ("conv2d", pw.bits, shape, stride, pad, dilation, parts), build)
        if act.split is None:
            return conv2d_w8a8(x, None, pw.scale, bias, **kw, **act_kw, packed=packed[0])  # type: ignore[index]
        return conv2d_w8a8_split(x, None, pw.scale, bias, split=act.split, **kw, **act_kw, packed=packed)


def prepacked_nbytes(module: torch.nn.Module) -> int:
    """Bytes of the prepacked weights cpu_int8 holds in ``module``'s frozen layers (measured; 0 before their first
    call). Once a layer's codes are released these are its only copy of the weight."""
    total = 0
    for m in module.modules():
        value = getattr(getattr(m, "prepack_slot", None), "value", None)
        if value is not None and value.backend == CpuInt8Backend.name:
            total += value.nbytes()
    return total
