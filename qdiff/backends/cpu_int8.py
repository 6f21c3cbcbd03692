"""Exact int8 CPU execution of frozen W8A8 / W4A8 layers (oneDNN VNNI kernels reached through torch ops).

Every function returns a tensor *equal* (``torch.equal``) to :mod:`qdiff.backends.reference` (``linear``,
``conv2d``, split activations included) for the same codes, scales and activation quantizer: activations are
quantized with the same math (:func:`qdiff.numerics.primitives.compute_qparams`, ``round(x.float() / scale)``
half to even, ``+ zp``, clamp), the integer products are accumulated exactly in int32, and the fp32 epilogue keeps
the reference order ``acc.float() * w_scale``, ``* a_scale``, ``+ bias``, ``.to(x.dtype)`` (group-wise:
``y = 0; y += acc_g.float() * s_g`` in group order).

Kernels (measured fastest on an AMD Zen 4 with AVX-512 VNNI, see ``scripts/bench_cpu_int8.py``):

* Linear: ``torch.ops.onednn.qlinear_pointwise`` on a prepacked weight and uint8 codes ``q + 128`` with
  zero-point ``zp + 128`` (oneDNN folds it exactly in int32). It returns ``float(acc) * w_scale`` in fp32 (one
  IEEE multiply, the reference's first epilogue step). Group-wise weights: one call per K group, each adding its
  scaled partial into the fp32 accumulator in place with oneDNN's ``sum`` post-op (``y + acc_g * s_g``, two
  roundings as in the reference), in row tiles that keep the accumulator in cache. ``kernel="int_mm"``:
  ``torch._int_mm`` (int32) with an in-place fp32 epilogue (slower; for builds without the oneDNN ops).
* Conv2d: ``torch.ops.onednn.qconv_pointwise`` on channels-last uint8 codes (oneDNN pads with the zero-point,
  i.e. the real value 0; an uneven 'same' padding is padded with the zero-point code beforehand), fp32
  ``float(acc) * w_scale`` out, epilogue in place, one transposed copy back to contiguous NCHW. (im2col +
  ``_int_mm`` measured 3.5x slower than oneDNN's direct conv here.)

These kernels are only exact where the CPU has VNNI (or AMX): the AVX2 / AVX-512 (no VNNI) int8 code paths
sum pairs of u8*s8 products in saturating int16 and are wrong for full-range int8 codes. :func:`self_test`
detects that; a caller must run it once (per process) before choosing this backend (:class:`CpuInt8Backend`
does, through the registry).

Prepacked weights (:class:`PackedLinear`, :class:`PackedConv`) come from :func:`prepack_linear` /
:func:`prepack_conv`; the layer functions take one through ``packed=``, else they look it up in an LRU cache
keyed by the identity of the weight and scale tensors, rebuilt when their data pointer or version changes
(``_PACK_CACHE``, the module's only mutable state: one entry per live weight, dropped by a weak-reference
callback when the weight is freed, at most ``_PACK_CACHE_SIZE``). It holds one prepacked copy of each weight.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from qdiff.numerics.primitives import compute_qparams, qrange, unpack_weight

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
    "self_test",
    "resident_nbytes",
]

_PACK_CACHE_SIZE = 4096  # prepacked layers kept (each about its int8 weight's bytes): more than a whole SDXL UNet
_ACC_TILE_BYTES = 1 << 23  # group-wise Linear: fp32 accumulator bytes per row tile (measured 0.5-8 MiB, untiled)
GATE_K = 23040  # the largest K of the supported models: SDXL's 3x3 convs over 2560 channels
_PACK_CACHE: OrderedDict[tuple, tuple[tuple[weakref.ref, ...], tuple, object]] = OrderedDict()
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------------


def onednn_available() -> bool:
    """True when torch exposes oneDNN's quantized linear / conv ops (x86 builds with mkldnn)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(hasattr(torch.ops.onednn, n) for n in ("qlinear_pointwise", "qlinear_prepack", "qconv_prepack"))
    except (AttributeError, RuntimeError):
        return False


def int8_gemm(qa: Tensor, qw_t: Tensor) -> Tensor:
    """Exact int32 GEMM: ``qa`` int8/uint8 (M, K) @ ``qw_t`` int8 (K, N) -> int32 (M, N).

    ``torch._int_mm`` on CPU takes any M, K, N here (no multiple-of-8 or M > 16 rule as on CUDA; checked for
    M=1, K=5, N=7) and any strides (``qw.t()`` of an (N, K) weight is as fast as a contiguous (K, N) copy). A
    torch whose ``_int_mm`` refuses the shape falls back to an exact float64 matmul (|acc| < 2**53).
    """
    try:
        return torch._int_mm(qa, qw_t)
    except RuntimeError:
        return (qa.double() @ qw_t.double()).to(torch.int32)


def _qlinear(qa: Tensor, zp: int, packed: Tensor, scale: Tensor, wzp: Tensor, accum: Tensor | None) -> Tensor:
    """oneDNN int8 GEMM: ``float(sum_k (qa - zp) * w) * scale`` fp32 (M, N); with ``accum``: ``accum + that``.

    ``qa`` uint8 (M, K) (an int8 source makes oneDNN fall back to its ``ref_int8`` kernel: exact, 1000x slower);
    ``packed`` from ``qlinear_prepack`` of an int8 (N, K) weight; ``scale`` fp32 (N,).
    """
    if accum is None:
        return torch.ops.onednn.qlinear_pointwise(
            qa, 1.0, zp, packed, scale, wzp, None, 1.0, 0, torch.float32, "none", [], ""
        )
    return torch.ops.onednn.qlinear_pointwise.binary(
        qa, 1.0, zp, packed, scale, wzp, accum, None, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], ""
    )


def _qconv(qx: Tensor, zp: int, pc: PackedConv) -> Tensor:
    """oneDNN int8 conv of uint8 channels-last ``qx`` (B, C, H, W): ``float(acc) * w_scale`` fp32 channels-last."""
    return torch.ops.onednn.qconv_pointwise(
        qx, 1.0, zp, pc.packed, pc.scale, pc.wzp, None, list(pc.stride), list(pc.padding), list(pc.dilation), 1,
        1.0, 0, torch.float32, "none", [], None,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# activation quantization (same arithmetic as qdiff.numerics.primitives.quantize, fewer temporaries)
# --------------------------------------------------------------------------------------------------------------------


def _absmax_rows(x2d: Tensor) -> Tensor:
    """max |x| per row of (M, K) as fp32 (M, 1); equal to ``x.float().abs().amax(-1, keepdim=True)``, no temporary."""
    mn, mx = x2d.amin(dim=-1, keepdim=True), x2d.amax(dim=-1, keepdim=True)  # 15x faster than torch.aminmax here
    return torch.maximum(mn.float().neg_(), mx.float())


def _u8_codes(x: Tensor, scale: Tensor, zp: Tensor | None, lo: int, hi: int) -> Tensor:
    """uint8 ``clamp(round(x / scale) + zp, lo, hi) + 128`` in x's layout (fp32 math as :func:`primitives.quantize`).

    Computed as ``clamp(round(x / scale) + (zp + 128), lo + 128, hi + 128)``: the integer additions are exact below
    2**23 and anything larger clamps to the same bound either way, so the codes are the reference's plus 128.
    """
    if scale.dim() == 0:  # a 0-dim fp32 scale would not promote a bf16/fp16 x: the division must run in fp32
        scale = scale.reshape(1)
    t = torch.div(x, scale)
    t.round_()
    t.add_(128 if zp is None else zp + 128)
    return t.clamp_(lo + 128, hi + 128).to(torch.uint8)


def quantize_act(
    x: Tensor, a_bits: int, a_mode: str, a_scale: Tensor | None, a_zp: Tensor | None
) -> tuple[Tensor, int, Tensor]:
    """Activation codes of ``x`` (M, K) (dynamic: per row) or (B, C, H, W) (dynamic: per sample), offset to uint8.

    Returns ``(q + 128`` uint8 in x's layout; ``zp + 128``; scale fp32 (M, 1) / (B, 1, 1, 1) dynamic, all-ones shape
    static``)`` where ``q`` are the reference's int8 codes (symmetric dynamic absmax scale from
    :func:`compute_qparams`; static asymmetric per tensor). oneDNN's fast int8 kernels take uint8 sources only.
    """
    rank = x.dim()
    if a_mode == "dynamic":
        absmax = _absmax_rows(x.flatten(1)).reshape(-1, *([1] * (rank - 1)))
        scale = compute_qparams(-absmax, absmax, a_bits, symmetric=True)[0]
        lo, hi = qrange(a_bits, True)
        return _u8_codes(x, scale, None, lo, hi), 128, scale
    if a_mode == "static":
        zp = _scalar_zp(a_scale, a_zp)
        lo, hi = qrange(a_bits, False)
        codes = _u8_codes(x, a_scale.detach().float(), a_zp.detach().float(), lo, hi)
        return codes, zp + 128, a_scale.detach().float().reshape([1] * rank)
    raise ValueError(f"a_mode must be 'dynamic' or 'static', got {a_mode!r}")


def _to_channels_last(t: Tensor) -> Tensor:
    """(B, C, H, W) -> the same values in channels-last memory.

    One 2-D transposed copy per sample: ATen's blocked transpose, 4-5x faster here than
    ``.contiguous(memory_format=torch.channels_last)``.
    """
    if t.is_contiguous(memory_format=torch.channels_last):
        return t
    t = t.contiguous()
    b, c, h, w = t.shape
    out = torch.empty((b, h, w, c), dtype=t.dtype)
    for i in range(b):
        out[i].view(h * w, c).copy_(t[i].view(c, h * w).t())
    return out.permute(0, 3, 1, 2)


def _to_nchw(t: Tensor) -> Tensor:
    """Channels-last (B, C, H, W) -> contiguous NCHW, one 2-D transposed copy per sample (see above)."""
    b, c, h, w = t.shape
    out = torch.empty((b, c, h, w), dtype=t.dtype)
    for i in range(b):
        out[i].view(c, h * w).copy_(t[i].permute(1, 2, 0).reshape(h * w, c).t())
    return out


def _scalar_zp(a_scale: Tensor | None, a_zp: Tensor | None) -> int:
    if a_scale is None or a_zp is None or a_scale.numel() != 1 or a_zp.numel() != 1:
        raise ValueError("static activations need per-tensor a_scale and a_zp (one element each)")
    return int(a_zp.reshape(()).item())


# --------------------------------------------------------------------------------------------------------------------
# prepacked weights and their cache
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """A frozen Linear's int8 weight prepared for the CPU kernels, split into K groups (one group for W8A8).

    ``weights[g]``: oneDNN packed (K_g, N) when ``kernel == "onednn"``, else int8 (K_g, N) contiguous;
    ``scales[g]``: fp32 (N,); ``bounds[g]``: the group's [lo, hi) columns of K; ``w_sums[g]``: int32 (N,) weight
    code sums (the ``_int_mm`` path folds a static zero-point with them); ``wzp``: int64 zeros (N,).
    """

    n: int
    k: int
    kernel: str
    weights: tuple[Tensor, ...]
    scales: tuple[Tensor, ...]
    bounds: tuple[tuple[int, int], ...]
    w_sums: tuple[Tensor, ...]
    wzp: Tensor

    @property
    def grouped(self) -> bool:
        return len(self.bounds) > 1

    def nbytes(self) -> int:
        """Resident bytes of the weight codes (oneDNN's blocked layouts estimated: K rounded up to 4, N to 16)."""
        return sum(_packed_bytes(w) for w in self.weights)


@dataclass(frozen=True, eq=False)
class PackedConv:
    """A frozen Conv2d (groups=1) weight prepacked for ``onednn.qconv_pointwise``; geometry is explicit."""

    weight_shape: tuple[int, int, int, int]
    packed: Tensor
    scale: Tensor  # fp32 (N,)
    wzp: Tensor  # int64 zeros (N,)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def nbytes(self) -> int:
        """Resident bytes: one byte per weight code (oneDNN's blocked padding not counted) + the fp32 scales."""
        return self.packed.numel() + self.scale.numel() * self.scale.element_size()


def resident_nbytes(module) -> int:
    """Bytes of the prepacked weight copies this backend holds for ``module``'s frozen layers, beside the stored
    (packed) codes the module itself holds; 0 for a layer that has not run on this backend yet."""
    ids = {id(t) for t in module.buffers()}
    total = 0
    for refs, _stamp, value in list(_PACK_CACHE.values()):
        owner = refs[0]()
        if owner is not None and id(owner) in ids:
            total += sum(v.nbytes() for v in (value if isinstance(value, tuple) else (value,)))
    return total


def _packed_bytes(w: Tensor) -> int:
    if w.is_mkldnn:
        k, n = w.shape
        return math.ceil(k / 4) * 4 * math.ceil(n / 16) * 16
    return w.numel() * w.element_size()


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


def _cached(kind: str, tensors: tuple[Tensor, ...], extra: tuple, build: Callable[[], _T]) -> _T:
    """``build()`` memoized per identity of ``tensors``; rebuilt when one's data pointer or version changed.

    One entry per live weight: a weak-reference callback drops it when a key tensor is freed (no stale packed
    copies), and the LRU bound ``_PACK_CACHE_SIZE`` caps it.
    """
    key = (kind, extra, *(id(t) for t in tensors))
    stamp = tuple((t.data_ptr(), _version(t)) for t in tensors)
    hit = _PACK_CACHE.get(key)
    if hit is not None and hit[1] == stamp and all(ref() is t for ref, t in zip(hit[0], tensors)):
        _PACK_CACHE.move_to_end(key)
        return hit[2]  # type: ignore[return-value]
    value = build()

    def forget(_ref: weakref.ref, key: tuple = key) -> None:
        _PACK_CACHE.pop(key, None)

    _PACK_CACHE[key] = (tuple(weakref.ref(t, forget) for t in tensors), stamp, value)
    _PACK_CACHE.move_to_end(key)
    while len(_PACK_CACHE) > _PACK_CACHE_SIZE:
        _PACK_CACHE.popitem(last=False)
    return value


def prepack_linear(
    qw: Tensor, w_scale: Tensor, group_size: int | None = None, *, kernel: str | None = None
) -> PackedLinear:
    """Prepare int8 codes ``qw`` (N, K) with scales (N, 1) / (1, 1) / (N, G) (``group_size`` when G > 1).

    ``kernel``: ``"onednn"`` (default when available) or ``"int_mm"``.
    """
    n, k = qw.shape
    kernel = kernel or ("onednn" if onednn_available() else "int_mm")
    ws = w_scale.detach().float()
    if ws.shape[1] > 1 and not group_size:
        raise ValueError(f"w_scale {tuple(ws.shape)} has several groups: give group_size")
    if ws.shape[1] == 1:
        bounds = ((0, k),)
        scales = (ws.reshape(-1).expand(n).clone(),)
    else:
        bounds = tuple((lo, min(lo + group_size, k)) for lo in range(0, k, group_size))
        scales = tuple(ws[:, g].clone() for g in range(len(bounds)))
    weights, sums = [], []
    for lo, hi in bounds:
        part = qw[:, lo:hi]
        sums.append(part.sum(dim=1, dtype=torch.int32))
        if kernel == "onednn":
            weights.append(torch.ops.onednn.qlinear_prepack(part.contiguous(), None))
        else:
            weights.append(part.t().contiguous())  # (K_g, N), a copy: no reference to the caller's tensor
    wzp = torch.zeros(n, dtype=torch.long)
    return PackedLinear(n, k, kernel, tuple(weights), scales, bounds, tuple(sums), wzp)


def prepack_conv(
    qw: Tensor,
    w_scale: Tensor,
    weight_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    x_shape: tuple[int, ...] | None = None,
) -> PackedConv:
    """Prepare int8 codes ``qw`` (N, C*kh*kw) or (N, C, kh, kw), scales (N, 1) / (1, 1), explicit padding.

    ``x_shape``: an input shape (B, C, H, W) for oneDNN to choose the weight layout; any one will do (measured:
    packed with a hint, the layout fits every input shape), but without one a 1x1 conv's weight is packed in a
    layout the kernel does not take and is reordered twice on every call.
    """
    n, c = weight_shape[:2]
    w4 = qw.reshape(weight_shape).contiguous()
    scale = w_scale.detach().float().reshape(-1).expand(n).clone()
    geometry = (tuple(int(s) for s in stride), tuple(int(p) for p in padding), tuple(int(d) for d in dilation))
    hint = list(x_shape) if x_shape is not None else [1, c, 32, 32]
    packed = torch.ops.onednn.qconv_prepack(w4, scale, 1.0, 128, *(list(g) for g in geometry), 1, hint)
    return PackedConv(tuple(weight_shape), packed, scale, torch.zeros(n, dtype=torch.long), *geometry)


# --------------------------------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------------------------------


def _group_partial(pl: PackedLinear, g: int, qa: Tensor, zp: int, y: Tensor | None) -> Tensor:
    """``(y +) float(sum_{k in group g} (qa - zp) * w) * s_g`` fp32 (M, N), as the reference accumulates it."""
    lo, hi = pl.bounds[g]
    qg = qa if not pl.grouped else qa[:, lo:hi]
    if pl.kernel == "onednn":
        return _qlinear(qg, zp, pl.weights[g], pl.scales[g], pl.wzp, y)
    acc = int8_gemm(qg, pl.weights[g])
    if zp:
        acc.sub_(pl.w_sums[g], alpha=zp)  # sum (u - zp) w = sum u w - zp sum w, exact in int32
    t = acc.float().mul_(pl.scales[g])
    return t if y is None else y.add_(t)


def _grouped(pl: PackedLinear, qa: Tensor, zp: int) -> Tensor:
    """``y = 0; y += float(acc_g) * s_g`` for g in order (the reference's fp32 accumulation): fp32 (M, N).

    Row tiles keep the accumulator in cache (``_ACC_TILE_BYTES``); each group adds into it in place (oneDNN's
    ``sum`` post-op), so no (M, N) temporary per group.
    """
    m = qa.shape[0]
    y = torch.zeros(m, pl.n)
    rows = max(64, _ACC_TILE_BYTES // (4 * pl.n))
    for r0 in range(0, m, rows):
        acc, q_rows = y[r0 : r0 + rows], qa[r0 : r0 + rows]
        for g in range(len(pl.bounds)):
            out = _group_partial(pl, g, q_rows, zp, acc)
            if out.data_ptr() != acc.data_ptr():  # a sum post-op that did not write in place
                acc.copy_(out)
    return y


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
    y = _grouped(pl, qa, zp) if pl.grouped else _group_partial(pl, 0, qa, zp, None)
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
    reference ``linear`` of an 8-bit per-channel / per-tensor weight. ``packed`` defaults to a cached
    :func:`prepack_linear`.
    """
    if packed is None:
        packed = _cached("linear", (qweight, w_scale), (), lambda: prepack_linear(qweight, w_scale))
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

    Equal to the reference ``linear`` of that group-wise weight; the last group may be ragged. The cached
    (or given) prepacked weight keeps the codes unpacked (one byte each), which ``scripts/bench_cpu_int8.py``
    measured against unpacking per call.
    """
    if packed is None:

        def build() -> PackedLinear:
            codes = qweight if qweight.dtype == torch.int8 else unpack_weight(qweight, w_bits, in_features)
            return prepack_linear(codes, w_scale, group_size)

        packed = _cached("linear", (qweight, w_scale), (group_size, in_features), build)
    return linear_packed(x, packed, bias, a_bits=a_bits, a_mode=a_mode, a_scale=a_scale, a_zp=a_zp)


# --------------------------------------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------------------------------------


def _finish_conv(y: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``(y + bias).to(dtype)`` as a contiguous NCHW tensor (``y`` fp32 channels-last, modified in place)."""
    if bias is not None:
        y.add_(bias.float().reshape(1, -1, 1, 1))
    return _to_nchw(y.to(dtype))


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
    return _to_channels_last(qx), zp, sa


def _packed_conv(qweight, w_scale, weight_shape, lo, hi, stride, pad, dilation, x_shape=None) -> PackedConv:
    """Cached :class:`PackedConv` of input channels [lo, hi) of the weight (all of them: lo=0, hi=C)."""
    n, _, kh, kw = weight_shape
    shape = (n, hi - lo, kh, kw)
    extra = (tuple(weight_shape), lo, hi, tuple(stride), pad, tuple(dilation))

    def build() -> PackedConv:
        return prepack_conv(qweight.reshape(weight_shape)[:, lo:hi], w_scale, shape, stride, pad, dilation, x_shape)

    return _cached("conv", (qweight, w_scale), extra, build)


def conv2d_w8a8(
    x: Tensor,
    qweight: Tensor,
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
    """W8A8 Conv2d (groups=1): x (B, C, H, W), int8 ``qweight`` (N, C*kh*kw), scales (N, 1) / (1, 1).

    Returns contiguous NCHW (B, N, Ho, Wo) in x's dtype, equal to the reference ``conv2d`` for 8-bit (or any
    unpacked int8 codes) per-channel / per-tensor weights. Needs oneDNN ops (:func:`onednn_available`).
    """
    pad, extra = _conv_geometry(padding, weight_shape, dilation)
    if packed is None:
        packed = _packed_conv(qweight, w_scale, weight_shape, 0, weight_shape[1], stride, pad, dilation, x.shape)
    qx, zp, sa = _conv_codes_padded(x, (a_bits, a_mode, a_scale, a_zp), extra)
    return _finish_conv(_qconv(qx, zp, packed).mul_(sa), bias, x.dtype)


def conv2d_w8a8_split(
    x: Tensor,
    qweight: Tensor,
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
    two parts' weights (input channels [0, split) and [split, C)).
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
        scale = None if a_scale is None else a_scale.reshape(2)[part]
        zp = None if a_zp is None else a_zp.reshape(2)[part]
        qx, zpu, sa = _conv_codes_padded(x[:, lo:hi], (a_bits, a_mode, scale, zp), extra)
        t = _qconv(qx, zpu, packed[part]).mul_(sa)
        y = t if y is None else y.add_(t)
    return _finish_conv(y, bias, x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# exactness gate
# --------------------------------------------------------------------------------------------------------------------


def _gate_cases(k: int, w_max: int, gen: torch.Generator) -> list[tuple[str, Tensor, Tensor, int]]:
    """(name, activation codes int8 (M, K), weight codes int8 (N, K), zero-point) worst cases for the GEMM.

    Two shapes only, (33, K) x (40, K) and a single row (1, K) x (24, K) (kernels differ for M=1): every new shape
    costs oneDNN a kernel generation.
    """

    def full(m: int, v: int) -> Tensor:
        return torch.full((m, k), v, dtype=torch.int8)

    def signs(m: int, mag: int) -> Tensor:
        return (torch.randint(0, 2, (m, k), generator=gen, dtype=torch.int8) * 2 - 1) * mag

    alt = torch.tensor([127, -127], dtype=torch.int8).repeat(k // 2 + 1)[:k].expand(33, k).contiguous()
    return [
        ("a=+127, w=+max", full(33, 127), full(40, w_max), 0),
        ("a=+127, w=-max", full(1, 127), full(24, -w_max), 0),
        ("a=-127, w=+max", full(33, -127), full(40, w_max), 0),
        ("a=-128, w=+max", full(1, -128), full(24, w_max), 0),
        ("a=-128, zp=127, w=-max", full(33, -128), full(40, -w_max), 127),
        ("a=+127, zp=-128, w=+max", full(1, 127), full(24, w_max), -128),
        ("alternating a=+-127, w=+-max", alt, signs(40, w_max), 0),
        ("random signs +-127 / +-max", signs(33, 127), signs(40, w_max), 0),
        ("random full range, zp=-37", torch.randint(-128, 128, (1, k), generator=gen, dtype=torch.int8),
         torch.randint(-w_max, w_max + 1, (24, k), generator=gen, dtype=torch.int8), -37),
    ]  # fmt: skip


def _exact(qa: Tensor, qw: Tensor, zp: int) -> Tensor:
    """Exact ``sum_k (qa - zp) * qw`` as float64 (M, N) (|acc| < 2**53)."""
    return (qa.double() - zp) @ qw.double().t()


def _check(name: str, got: Tensor, want: Tensor) -> str | None:
    if got.shape == want.shape and torch.equal(got, want):
        return None
    bad = int((got != want).sum()) if got.shape == want.shape else -1
    return f"{name}: {bad} of {want.numel()} outputs differ from the exact result"


def _u8(qa: Tensor) -> Tensor:
    return (qa.to(torch.int16) + 128).to(torch.uint8)


def _gate_gemm(k: int, w_max: int, gen: torch.Generator, use_onednn: bool) -> str | None:
    for name, qa, qw, zp in _gate_cases(k, w_max, gen):
        ref = _exact(qa, qw, zp)
        if zp == 0 and (err := _check(f"_int_mm int8 [{name}, K={k}]", int8_gemm(qa, qw.t()).double(), ref)):
            return err
        got = int8_gemm(_u8(qa), qw.t()).double() - (zp + 128) * qw.double().sum(1)
        if err := _check(f"_int_mm uint8 [{name}, K={k}]", got, ref):
            return err
        if use_onednn:
            ws = torch.rand(qw.shape[0], generator=gen) * 1e-3 + 1e-6
            pl = prepack_linear(qw, ws.reshape(-1, 1), kernel="onednn")
            got = _qlinear(_u8(qa), zp + 128, pl.weights[0], pl.scales[0], pl.wzp, None)
            if err := _check(f"onednn qlinear [{name}, K={k}]", got, ref.to(torch.int32).float() * ws):
                return err
    return None


def _gate_grouped(k: int, w_max: int, gen: torch.Generator) -> str | None:
    """Group-wise accumulation through the ``sum`` post-op equals ``sum_g float(acc_g) * s_g`` in group order."""
    gs = max(4, k // 3 - 3)  # 4 groups, the last one ragged
    qa = (torch.randint(0, 2, (33, k), generator=gen, dtype=torch.int8) * 2 - 1) * 127
    qw = torch.randint(-w_max, w_max + 1, (40, k), generator=gen, dtype=torch.int8)
    ws = torch.rand(40, math.ceil(k / gs), generator=gen) * torch.logspace(-4, 0, 40).reshape(-1, 1)
    pl = prepack_linear(qw, ws, gs, kernel="onednn")
    y = _grouped(pl, _u8(qa), 128)
    want = torch.zeros(33, 40)
    for g, (lo, hi) in enumerate(pl.bounds):
        want += _exact(qa[:, lo:hi], qw[:, lo:hi], 0).to(torch.int32).float() * ws[:, g]
    return _check(f"onednn grouped sum post-op [K={k}, group {gs}]", y, want)


def _gate_conv(w_max: int, gen: torch.Generator) -> str | None:
    """3x3 padded conv on extreme codes: padded pixels must be the zero-point, sums exact."""
    c = 64
    for name, lo, hi, zp in (("u8 255 (code +127), zp 128", 255, 256, 128), ("u8 0/255 random, zp 0", 0, 256, 0)):
        q = torch.randint(lo, hi, (2, c, 6, 5), generator=gen, dtype=torch.uint8)
        qw = (torch.randint(0, 2, (24, c, 3, 3), generator=gen, dtype=torch.int8) * 2 - 1) * w_max
        ws = torch.rand(24, generator=gen) + 0.5
        pc = prepack_conv(qw, ws.reshape(-1, 1), qw.shape, (1, 1), (1, 1), (1, 1))
        got = _qconv(q.contiguous(memory_format=torch.channels_last), zp, pc)
        acc = torch.nn.functional.conv2d(q.double() - zp, qw.double(), padding=1)
        if err := _check(f"onednn qconv [{name}]", got, acc.to(torch.int32).float() * ws.reshape(1, -1, 1, 1)):
            return err
    return None


def self_test(k_max: int, *, w_bits: int = 8) -> tuple[bool, str]:
    """Exactness gate for this CPU: (True, summary) when every int8 kernel used here is exact up to K = ``k_max``.

    Runs ``torch._int_mm`` and (when present) oneDNN's quantized linear (fused weight scale, zero-point, the group
    ``sum`` post-op) and conv (zero-point padding) on worst-case codes (all +-127 / -128 with +-(2**(w_bits-1)-1)
    weights, alternating and random signs) at K = ``k_max`` and K = 7, M = 33 and M = 1, against float64 integer
    matmuls. Fails on CPUs whose int8 path saturates int16 pair sums (no VNNI). ``w_bits=4`` checks only the range
    W4A8 needs (exact on such CPUs too). Well under a second (oneDNN generates a kernel per shape).
    """
    w_max = 2 ** (w_bits - 1) - 1
    if k_max < 1 or k_max * 255 * w_max >= 2**31:
        return False, f"k_max={k_max}: int32 accumulation of 8-bit x {w_bits}-bit codes can overflow"
    gen = torch.Generator().manual_seed(0)
    use_onednn = onednn_available()
    for k in sorted({k_max, min(k_max, 7)}, reverse=True):
        if err := _gate_gemm(k, w_max, gen, use_onednn):
            return False, err
    if use_onednn:
        if err := _gate_grouped(k_max, w_max, gen) or _gate_conv(w_max, gen):
            return False, err
    kernels = "torch._int_mm" + (", oneDNN qlinear/qconv" if use_onednn else "")
    return True, f"{kernels}: exact on worst-case int8 x int{w_bits} codes up to K={k_max}"


# --------------------------------------------------------------------------------------------------------------------
# backend adapter (qdiff.backends.registry protocol)
# --------------------------------------------------------------------------------------------------------------------


class CpuInt8Backend:
    """Exact int8 kernels on CPUs with VNNI: Linear with any weight codes (W8A8, group-wise W4A8/W3A8, ...) and
    groups=1 Conv2d with per-channel / per-tensor weight scales (split activations included).

    Not covered (the reference runs them): weight-only layers, group-wise Conv2d weights, non-CPU tensors.
    Unavailable (self-test fails) without oneDNN's quantized ops or without exact int8 kernels (no VNNI).
    """

    name = "cpu_int8"

    def self_test(self) -> tuple[bool, str]:
        if not onednn_available():
            return False, "this torch has no oneDNN quantized ops (torch.ops.onednn.qlinear_pointwise)"
        return self_test(GATE_K)

    def device_error(self, device: torch.device, requested: bool) -> str | None:
        return None if device.type == "cpu" else f"kernel 'cpu_int8' runs on CPU tensors, got one on {device.type}"

    def supports(self, op: str, x: Tensor, pw, act, geom) -> bool:
        if act.bits is None or x.device.type != "cpu" or pw.codes.device.type != "cpu":
            return False
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and (op == "linear" or not pw.grouped)

    def linear(self, x: Tensor, pw, act, bias: Tensor | None) -> Tensor:
        group_size = pw.group_size if pw.grouped else None
        key = (pw.bits, pw.k, group_size)
        packed = _cached("pw", (pw.codes, pw.scale), key, lambda: prepack_linear(pw.unpack(), pw.scale, group_size))
        return linear_packed(x, packed, bias, a_bits=act.bits, a_mode=act.mode, a_scale=act.scale, a_zp=act.zp)

    def conv2d(self, x: Tensor, pw, act, bias: Tensor | None, geom) -> Tensor:
        shape, stride, dilation = tuple(geom.weight_shape), tuple(geom.stride), tuple(geom.dilation)
        pad = _conv_geometry(geom.padding, shape, dilation)[0]
        kw = {"weight_shape": shape, "stride": stride, "padding": geom.padding, "dilation": dilation}
        act_kw = {"a_bits": act.bits, "a_mode": act.mode, "a_scale": act.scale, "a_zp": act.zp}
        parts = ((0, shape[1]),) if act.split is None else ((0, act.split), (act.split, shape[1]))

        def build() -> tuple[PackedConv, ...]:
            w4 = pw.unpack().reshape(shape)
            return tuple(
                prepack_conv(
                    w4[:, lo:hi],
                    pw.scale,
                    (shape[0], hi - lo, *shape[2:]),
                    stride,
                    pad,
                    dilation,
                    (x.shape[0], hi - lo, *x.shape[2:]),
                )  # fmt: skip
                for lo, hi in parts
            )

        packed = _cached("pw_conv", (pw.codes, pw.scale), (pw.bits, shape, stride, pad, dilation, parts), build)
        if act.split is None:
            return conv2d_w8a8(x, pw.codes, pw.scale, bias, **kw, **act_kw, packed=packed[0])
        return conv2d_w8a8_split(x, pw.codes, pw.scale, bias, split=act.split, **kw, **act_kw, packed=packed)
