"""The packed weight of a frozen layer: integer codes, scales, bit-width, group size and layout in one object.

Layout ``"v1"`` (export format 1; the module buffers ``qweight`` / ``w_scale`` hold exactly these tensors):

* ``codes`` — 8-bit: int8 (N, K), K-contiguous. 4- and 3-bit: uint8 (N, ceil(K/2)), byte j holding k = 2j in its low
  nibble and k = 2j+1 in its high nibble (two's complement; 3-bit codes are stored as 4-bit). 2-bit: uint8
  (N, ceil(K/4)), k = 4j + i in bits 2i..2i+1 (see :func:`~qdiff.numerics.primitives.pack_weight`).
* ``scale`` — fp32, (1, 1) per tensor, (N, 1) per output channel, (N, G) per group of ``group_size`` inputs
  (G = ceil(K / group_size), the last group may be ragged). Weights are symmetric: the zero-point is 0.

A :class:`PackedWeight` is a view: building one from a module's buffers copies nothing.

A backend may keep the codes in its own layout instead (cpu_int8: oneDNN's prepacked int8): it puts a
:class:`Prepacked` copy into the layer's :class:`PrepackSlot` (carried here as ``slot``), and once the layer has
checked that the copy gives its codes back exactly, the layer releases its own ``codes`` (a ``meta`` placeholder of
the stored shape stays): :attr:`PackedWeight.released`. :meth:`PackedWeight.stored_codes` and
:meth:`PackedWeight.unpack` then rebuild the codes from that copy, so every other reader (the reference backend,
``state_dict``, ``dequantize``) sees the same codes as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.numerics.primitives import (
    check_bits,
    dequantize_weight,
    num_groups,
    pack_weight,
    packed_width,
    quantize_weight,
    storage_bits,
    unpack_weight,
)

LAYOUTS = ("v1",)


class Prepacked(Protocol):
    """A backend's copy of a layer's codes in its own layout, which gives the codes back exactly."""

    backend: str  # the backend that made it (``qdiff inspect --resident`` groups layers by it)

    def int8_codes(self) -> Tensor:
        """The codes as int8 (N, K), rebuilt from the copy (a new tensor, or a view of one: may be strided)."""

    def nbytes(self) -> int:
        """Bytes the copy holds (measured by the allocator where it can be)."""

    def copy(self) -> Prepacked:
        """An independent copy (``copy.deepcopy`` of a layer)."""


class PrepackSlot:
    """Where a frozen layer keeps a backend's :class:`Prepacked` copy of its codes: one per layer, owned by it.

    Backends reach it through the :class:`PackedWeight` the layer hands them (``pw.slot``); ``value`` is None until
    one prepacks. Not a buffer: never saved, never moved by ``.to()`` (the layer handles both).
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Prepacked | None = None

    def __deepcopy__(self, memo: dict) -> PrepackSlot:
        new = PrepackSlot()
        new.value = None if self.value is None else self.value.copy()
        return new


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """Packed symmetric weight codes of an (N, K) weight plus their scales (see the module docstring for layout).

    ``sums`` optionally carries :meth:`code_sums` precomputed (int32 (N, 1|G)); it is derived, never stored.
    ``slot``: the owning layer's :class:`PrepackSlot` (None for a free-standing weight).
    """

    codes: Tensor
    scale: Tensor
    bits: int
    k: int
    group_size: int | None = None
    layout: str = "v1"
    sums: Tensor | None = None
    slot: PrepackSlot | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.layout not in LAYOUTS:
            raise ValueError(f"packed weight layout must be one of {LAYOUTS}, got {self.layout!r}")
        want = (torch.int8 if storage_bits(self.bits) == 8 else torch.uint8, packed_width(self.k, self.bits))
        if self.codes.dim() != 2 or (self.codes.dtype, self.codes.shape[1]) != want:
            raise ValueError(
                f"{self.bits}-bit codes for K={self.k} must be {want[0]} (N, {want[1]}), "
                f"got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        if self.scale.dim() != 2 or self.scale.shape[0] not in (1, self.n):
            raise ValueError(f"weight scale must be (1|{self.n}, G), got {tuple(self.scale.shape)}")

    # ---- construction --------------------------------------------------------------------------------------------
    @classmethod
    def quantize(cls, w2d: Tensor, scale: Tensor, bits: int, group_size: int | None = None) -> PackedWeight:
        """Quantize and pack a float weight ``w2d`` (N, K) with ``scale`` fp32 (1,1)/(N,1)/(N,G)."""
        scale = scale.float().contiguous()
        q = quantize_weight(w2d.float(), scale, bits, group_size)  # (N, K) int8
        return cls(pack_weight(q, bits).contiguous(), scale, int(bits), w2d.shape[1], group_size)

    @classmethod
    def empty(
        cls,
        n: int,
        k: int,
        bits: int,
        granularity: str,
        group_size: int | None = None,
        device: torch.device | str = "meta",
    ) -> PackedWeight:
        """Uninitialised tensors of the stored shapes (load shells). The one place the stored sizes are derived."""
        check_bits(bits)
        codes_dtype = torch.int8 if storage_bits(bits) == 8 else torch.uint8
        rows = 1 if granularity == "tensor" else n
        groups = num_groups(k, group_size) if granularity == "group" else 1
        codes = torch.empty(n, packed_width(k, bits), dtype=codes_dtype, device=device)
        scale = torch.empty(rows, groups, dtype=torch.float32, device=device)
        return cls(codes, scale, int(bits), k, group_size if granularity == "group" else None)

    # ---- views ---------------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Output channels N."""
        return self.codes.shape[0]

    @property
    def num_groups(self) -> int:
        """Scale columns: 1 for per-tensor / per-channel scales, G for group-wise ones."""
        return self.scale.shape[1]

    @property
    def grouped(self) -> bool:
        """True when each group of ``group_size`` inputs has its own scale (more than one group)."""
        return self.group_size is not None and self.num_groups > 1

    @property
    def released(self) -> bool:
        """True when the codes live only in the slot's prepacked copy (``codes`` is a ``meta`` placeholder)."""
        return self.codes.is_meta and self.slot is not None and self.slot.value is not None

    @property
    def device(self) -> torch.device:
        """Where the codes are: the scales' device once released (backends prepack on the device they run on)."""
        return self.scale.device if self.released else self.codes.device

    def codes_from_slot(self) -> Tensor:
        """The layout-v1 codes rebuilt from the slot's prepacked copy (a new tensor, shape of ``codes``)."""
        if self.slot is None or self.slot.value is None:
            raise ValueError("no prepacked copy of these codes")
        return pack_weight(self.slot.value.int8_codes(), self.bits)

    def equals_slot(self) -> bool:
        """True when the slot's prepacked copy gives back exactly ``codes`` (compared as int8 (N, K) codes, and
        repacked when the codes are packed, so stray padding bits in the stored bytes count as a difference)."""
        if self.slot is None or self.slot.value is None or self.codes.is_meta:
            return False
        codes = self.slot.value.int8_codes()
        if storage_bits(self.bits) == 8:
            return torch.equal(codes, self.codes)
        try:
            return torch.equal(pack_weight(codes, self.bits), self.codes)
        except ValueError:  # codes outside the bit-width's range (a foreign export): they cannot be repacked
            return False

    def stored_codes(self) -> Tensor:
        """The codes in layout v1: the ``codes`` tensor itself, or rebuilt exactly from the prepacked copy."""
        return self.codes_from_slot() if self.released else self.codes

    def unpack(self) -> Tensor:
        """int8 codes (N, K) (8-bit: the stored tensor itself, no copy; released: rebuilt from the copy, which may be
        a strided view)."""
        if self.released:
            return self.slot.value.int8_codes()  # type: ignore[union-attr]
        return unpack_weight(self.codes, self.bits, self.k)

    def dequantize(self) -> Tensor:
        """fp32 (N, K) = codes * scale."""
        return dequantize_weight(self.unpack(), self.scale, self.group_size)

    def code_sums(self) -> Tensor:
        """Per-group sums of the codes, int32 (N, 1|G): folds a static activation zero-point out of an int8 GEMM.

        ``sum_k (q_a - zp) * w = sum_k q_a * w - zp * sum_k w`` per group. Returns ``sums`` when it was attached.
        """
        if self.sums is not None:
            return self.sums
        qw = self.unpack().to(torch.int32)  # (N, K)
        if not self.grouped:
            return qw.sum(dim=1, keepdim=True, dtype=torch.int32)
        gs, g = int(self.group_size), self.num_groups  # type: ignore[arg-type]
        qw = F.pad(qw, (0, g * gs - self.k))
        return qw.reshape(self.n, g, gs).sum(dim=2, dtype=torch.int32)

    def nbytes(self) -> int:
        """Bytes of its tensors in the stored layout (codes, scales, and the derived sums when attached), measured
        from their shapes and dtypes: a ``meta`` shell or a released placeholder counts what it stands for. What a
        layer holds in memory, prepacked copies included, is ``QuantLayer.nbytes()``."""
        tensors = [t for t in (self.codes, self.scale, self.sums) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
