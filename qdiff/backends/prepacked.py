"""cpu_int8's copy of a frozen layer's codes: oneDNN-prepacked weights, kept in the layer's own ``PrepackSlot``.

Life cycle (the layer side is :class:`qdiff.quant.modules.QuantLayer`):

1. the first call on cpu_int8 prepacks the layer's codes (:func:`held`) and puts an :class:`OneDnnCodes` into the
   slot the layer handed over inside its :class:`~qdiff.numerics.packed.PackedWeight`;
2. after that call the layer reads the codes back from this copy (:meth:`OneDnnCodes.int8_codes`: oneDNN reorders
   its blocked int8 layout to the plain one, a permutation of the same bytes), and only if they equal its own, bit
   for bit, releases its own: from then on this copy is the one resident copy of the weight;
3. whoever needs the codes again (``state_dict`` / save, the reference backend, ``dequantized_weight``, a move to
   another device, ``load_state_dict``) gets them rebuilt from it.

A held copy is reused while it was made for the same call layout (``key``: op, bits, K groups / conv geometry and
input-channel parts) and from the same scale tensor, and from the same codes tensor while those are still the
layer's own (``stamp``: the tensor itself, its data pointer and version counter): an in-place edit of either
rebuilds it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from qdiff.backends.onednn import PackedConv, PackedLinear, conv_codes, linear_codes
from qdiff.numerics.packed import PackedWeight

__all__ = ["OneDnnCodes", "held"]

Packed = PackedLinear | tuple[PackedConv, ...]
_Ident = tuple[weakref.ref, int, int]


@dataclass(frozen=True, eq=False)
class OneDnnCodes:
    """A layer's codes prepacked for cpu_int8 (a :class:`~qdiff.numerics.packed.Prepacked`).

    ``packed``: a :class:`PackedLinear` (Linear, group-wise Conv2d) or the :class:`PackedConv` input-channel parts
    of a Conv2d (one part, or two for split activations); ``key`` what it was made for; ``scale`` / ``codes``: the
    identity of the tensors it was made from (None: not known, as in a copy; ``codes`` is only checked while the layer
    still holds its own).
    """

    key: tuple
    packed: Packed
    scale: _Ident | None
    codes: _Ident | None
    backend: str = "cpu_int8"

    def int8_codes(self) -> Tensor:
        """int8 (N, K) codes read back from the oneDNN weights (a new tensor; Linear: the transposed view of one)."""
        if isinstance(self.packed, PackedLinear):
            return linear_codes(self.packed)
        return conv_codes(self.packed)

    def nbytes(self) -> int:
        """Bytes held: the prepacked weights (oneDNN's blocked layout and compensation), their scales and
        zero-points (``tests/backends/test_resident.py`` checks this against the C allocator)."""
        parts = (self.packed,) if isinstance(self.packed, PackedLinear) else self.packed
        return sum(p.nbytes() for p in parts)

    def copy(self) -> OneDnnCodes:
        """A copy with its own oneDNN weights (made stale on purpose: the next call of the copy's layer rebuilds
        it from these codes and its own scale tensor)."""
        linear = isinstance(self.packed, PackedLinear)
        packed = self.packed.clone() if linear else tuple(p.clone() for p in self.packed)  # type: ignore[union-attr]
        return OneDnnCodes(self.key, packed, None, None)


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return -1


def _ident(t: Tensor) -> _Ident:
    return (weakref.ref(t), t.data_ptr(), _version(t))


def _same(ident: _Ident | None, t: Tensor) -> bool:
    return ident is not None and ident[0]() is t and ident[1:] == (t.data_ptr(), _version(t))


def held(pw: PackedWeight, key: tuple, build: Callable[[], Packed]) -> Packed:
    """The prepacked weights for ``pw`` made for ``key``: the ones in ``pw.slot`` when still valid, else ``build()``
    (from ``pw.unpack()``: from the held copy once the layer released its codes), kept there. Without a slot (a
    free-standing weight) it is built on every call."""
    slot = pw.slot
    value = None if slot is None else slot.value
    if isinstance(value, OneDnnCodes) and value.key == key and _same(value.scale, pw.scale):
        if pw.codes.is_meta or _same(value.codes, pw.codes):
            return value.packed
    packed = build()
    if slot is not None:
        codes = None if pw.codes.is_meta else _ident(pw.codes)
        slot.value = OneDnnCodes(key, packed, _ident(pw.scale), codes)
    return packed
