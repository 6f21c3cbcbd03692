"""oneDNN's exact int8 kernels (reached through torch ops), prepacked weights and their per-process cache.

* Linear: ``torch.ops.onednn.qlinear_pointwise`` on a prepacked weight and uint8 codes ``q + 128`` with
  zero-point ``zp + 128`` (oneDNN folds it exactly in int32). It returns ``float(acc) * w_scale`` in fp32 (one
  IEEE multiply, the reference's first epilogue step). Group-wise weights: one call per K group, each adding its
  scaled partial into the fp32 accumulator in place with oneDNN's ``sum`` post-op (``y + acc_g * s_g``, two
  roundings as in the reference), in row tiles that keep the accumulator in cache. ``kernel="int_mm"``:
  ``torch._int_mm`` (int32) with an in-place fp32 epilogue (slower; for builds without the oneDNN ops).
* Conv2d: ``torch.ops.onednn.qconv_pointwise`` on channels-last uint8 codes (oneDNN pads with the zero-point,
  i.e. the real value 0), fp32 ``float(acc) * w_scale`` out.

Only exact where the CPU has VNNI (or AMX): see :mod:`qdiff.backends.int8_gate`.

Prepacked weights (:class:`PackedLinear`, :class:`PackedConv`) come from :func:`prepack_linear` /
:func:`prepack_conv` and hold no reference to the codes they were made from: :func:`linear_codes` /
:func:`conv_codes` give those codes back (oneDNN reorders its blocked int8 layout to the plain one: a permutation of
the same bytes). Their ``nbytes`` is oneDNN's blocked size (``tests/backends`` checks it against the C allocator's
bytes in use). Who keeps them is the caller's business (the cpu_int8 backend: the layer's
:class:`~qdiff.numerics.packed.PrepackSlot`); this module has no state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "PackedLinear",
    "PackedConv",
    "onednn_available",
    "int8_gemm",
    "qlinear",
    "qconv",
    "prepack_linear",
    "prepack_conv",
    "packed_matmul",
    "linear_codes",
    "conv_codes",
]

_ACC_TILE_BYTES = 1 << 23  # group-wise Linear: fp32 accumulator bytes per row tile (measured 0.5-8 MiB, untiled)
_T = TypeVar("_T")


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


def qlinear(qa: Tensor, zp: int, packed: Tensor, scale: Tensor, wzp: Tensor, accum: Tensor | None) -> Tensor:
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


def qconv(qx: Tensor, zp: int, pc: PackedConv) -> Tensor:
    """oneDNN int8 conv of uint8 channels-last ``qx`` (B, C, H, W): ``float(acc) * w_scale`` fp32 channels-last."""
    return torch.ops.onednn.qconv_pointwise(
        qx, 1.0, zp, pc.packed, pc.scale, pc.wzp, None, list(pc.stride), list(pc.padding), list(pc.dilation), 1,
        1.0, 0, torch.float32, "none", [], None,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# prepacked weights and their cache
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """A frozen Linear's int8 weight prepared for the CPU kernels, split into K groups (one group for W8A8).

    ``weights[g]``: oneDNN packed (K_g, N) when ``kernel == "onednn"``, else int8 (K_g, N) contiguous;
    ``scales[g]``: fp32 (N,); ``bounds[g]``: the group's [lo, hi) columns of K; ``w_sums[g]``: int32 (N,) weight
    code sums (only the ``_int_mm`` path, which folds a static zero-point with them; empty for oneDNN, which folds it
    itself); ``wzp``: int64 zeros (N,).
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
        """Resident bytes: the weights (:func:`_packed_bytes`), scales, code sums and zero-points."""
        extras = (*self.scales, *self.w_sums, self.wzp)
        return sum(_packed_bytes(w) for w in self.weights) + sum(t.nbytes for t in extras)

    def clone(self) -> PackedLinear:
        """An independent copy (oneDNN tensors cannot be deep-copied, but they can be cloned)."""
        return _cloned(self)


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
        """Resident bytes: the packed weight (oneDNN's blocked layout: N rounded up to 16, C to 4; its int32
        compensation per output) + the scales and zero-points."""
        n, c, kh, kw = self.weight_shape
        codes = math.ceil(n / 16) * 16 * math.ceil(c / 4) * 4 * kh * kw + 4 * n
        return codes + self.scale.nbytes + self.wzp.nbytes

    def clone(self) -> PackedConv:
        """An independent copy (oneDNN tensors cannot be deep-copied, but they can be cloned)."""
        return _cloned(self)


def _cloned(obj: _T) -> _T:
    """``obj`` (a frozen dataclass) with every tensor field, or tuple of tensors, cloned."""
    changes = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = value.clone()
        elif isinstance(value, tuple) and value and isinstance(value[0], Tensor):
            changes[f.name] = tuple(t.clone() for t in value)
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


def linear_codes(pl: PackedLinear) -> Tensor:
    """The int8 codes (N, K) a :class:`PackedLinear` was made from, read back from its weights: the transposed view
    of a new (K, N) tensor (one copy of the codes; ``.contiguous()`` makes a second)."""
    parts = [w.to_dense() if w.is_mkldnn else w for w in pl.weights]  # (K_g, N) each
    fresh = len(parts) == 1 and pl.weights[0].is_mkldnn  # to_dense made a new tensor; cat copies the others
    return (parts[0] if fresh else torch.cat(parts, 0)).t()


def conv_codes(parts: tuple[PackedConv, ...]) -> Tensor:
    """The int8 codes (N, C*kh*kw) of a conv weight prepacked in input-channel parts (one part: the whole weight)."""
    dense = [pc.packed.to_dense() for pc in parts]  # (N, C_i, kh, kw) each
    w4 = dense[0] if len(dense) == 1 else torch.cat(dense, 1)
    return w4.reshape(w4.shape[0], -1).contiguous()


def _packed_bytes(w: Tensor) -> int:
    """Bytes of one prepacked (K, N) weight: oneDNN's blocked layout (K rounded up to 4, N to 16) and its int32
    compensation per output; a plain tensor's own bytes."""
    if w.is_mkldnn:
        k, n = w.shape
        return math.ceil(k / 4) * 4 * math.ceil(n / 16) * 16 + 4 * n
    return w.numel() * w.element_size()


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
    sums = tuple(qw[:, lo:hi].sum(dim=1, dtype=torch.int32) for lo, hi in bounds) if kernel != "onednn" else ()

    if kernel == "onednn":
        weights = tuple(torch.ops.onednn.qlinear_prepack(qw[:, lo:hi].contiguous(), None) for lo, hi in bounds)
    else:
        weights = tuple(qw[:, lo:hi].t().contiguous() for lo, hi in bounds)  # (K_g, N) copies: no reference to qw
    wzp = torch.zeros(n, dtype=torch.long)
    return PackedLinear(n, k, kernel, weights, scales, bounds, sums, wzp)


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
# matmul over a prepacked weight
# --------------------------------------------------------------------------------------------------------------------


def _group_partial(pl: PackedLinear, g: int, qa: Tensor, zp: int, y: Tensor | None) -> Tensor:
    """``(y +) float(sum_{k in group g} (qa - zp) * w) * s_g`` fp32 (M, N), as the reference accumulates it."""
    lo, hi = pl.bounds[g]
    qg = qa if not pl.grouped else qa[:, lo:hi]
    if pl.kernel == "onednn":
        return qlinear(qg, zp, pl.weights[g], pl.scales[g], pl.wzp, y)
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


def packed_matmul(pl: PackedLinear, qa: Tensor, zp: int) -> Tensor:
    """``sum_g float(sum_{k in g} (qa - zp) * w) * s_g`` fp32 (M, N) for uint8 codes ``qa`` (M, K), zero-point ``zp``.

    The activation scale is not applied. One group: the fp32 ``float(acc) * w_scale`` of the reference.
    """
    return _grouped(pl, qa, zp) if pl.grouped else _group_partial(pl, 0, qa, zp, None)
