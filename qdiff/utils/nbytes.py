"""Measured bytes of a module: every tensor it holds, each storage counted once, whatever library made it.

Parameters and buffers are not enough once another quantization library has touched a model:

* tensor subclasses (torchao ``Int8Tensor`` / ``IntxUnpackedToInt8Tensor``, optimum-quanto ``WeightQBytesTensor`` /
  ``WeightQBitsTensor`` / ``PackedTensor``) wrap plain tensors; ``untyped_storage()`` on the wrapper raises
  ("invalid python storage"), so they are flattened with ``__tensor_flatten__`` (recursively) to the plain tensors
  that own memory;
* library state hangs off tensors and modules as plain attributes: bitsandbytes ``Params4bit.quant_state``
  (absmax, code, offset and the nested ``state2``), ``Int8Params.CB`` / ``SCB``, ``Linear8bitLt.state``
  (``MatmulLtState.CB`` / ``SCB``), ``Linear4bit.quant_state``.

So the walk visits registered parameters, buffers and child modules, then every other attribute of each module and
tensor (objects, lists, tuples, dicts, up to :data:`MAX_DEPTH` levels; a module reached through a plain attribute is
not entered: it is not held, only referenced). Bytes come from the plain tensors' storages: per storage
(device, data pointer, storage bytes) the union of the byte ranges its tensors span, so views, aliases (``CB`` is
``weight.data``) and shared codebooks count once. Pure torch and duck typing: no peer library is imported here.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

MAX_DEPTH = 6  # attribute levels followed below a module or tensor (QuantState.state2.absmax is 3)
_SKIP_TYPES = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType, str, bytes)
# nn.Module's own bookkeeping (hooks, _parameters, ...): parameters, buffers and children are walked explicitly
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def held_tensors(*objs: Any) -> list[Tensor]:
    """The plain (storage-owning) tensors held by ``objs`` (modules, tensors, objects), each object visited once."""
    out: list[Tensor] = []
    seen: set[int] = set()
    for obj in objs:
        out.extend(_walk(obj, seen, 0, enter_modules=True))
    return out


def storage_nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes spanned by ``tensors`` in their storages: per storage the union of byte ranges (meta tensors: 0)."""
    spans: dict[tuple, list[tuple[int, int]]] = {}
    loose = 0
    for t in tensors:
        if t.is_meta or t.numel() == 0:
            continue
        size = t.element_size()
        extent = (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))) * size
        try:
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr(), storage.nbytes())
        except (RuntimeError, NotImplementedError, TypeError):  # no real storage: count it, no dedupe possible
            loose += t.numel() * size
            continue
        start = t.storage_offset() * size
        spans.setdefault(key, []).append((start, start + extent))
    return loose + sum(_union(ranges) for ranges in spans.values())


def nbytes(*objs: Any) -> int:
    """Measured bytes of everything ``objs`` hold (storages shared between them counted once)."""
    return storage_nbytes(held_tensors(*objs))


def module_nbytes(module: nn.Module) -> int:
    """Measured bytes of a module: parameters, buffers, tensor-subclass parts and library state, storages once."""
    return nbytes(module)


def _union(ranges: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for lo, hi in sorted(ranges):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def _walk(obj: Any, seen: set[int], depth: int, enter_modules: bool) -> Iterator[Tensor]:
    if obj is None or isinstance(obj, _SKIP_TYPES) or depth > MAX_DEPTH or id(obj) in seen:
        return
    if isinstance(obj, nn.Module) and not enter_modules:
        return  # referenced, not held (bitsandbytes Params4bit.module points back at its layer)
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield from _tensor_parts(obj, seen, depth)
    elif isinstance(obj, nn.Module):
        for group in (obj._parameters, obj._buffers, obj._modules):
            for value in group.values():
                yield from _walk(value, seen, 0, enter_modules=True)
        for key, value in vars(obj).items():
            if key not in _MODULE_INTERNALS:
                yield from _walk(value, seen, 1, enter_modules=False)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _walk(value, seen, depth + 1, enter_modules=False)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            yield from _walk(value, seen, depth + 1, enter_modules=False)
    else:
        for value in _attributes(obj):
            yield from _walk(value, seen, depth + 1, enter_modules=False)


def _tensor_parts(t: Tensor, seen: set[int], depth: int) -> Iterator[Tensor]:
    """A plain tensor itself; a wrapper subclass's flattened inner tensors; then state kept on the tensor object."""
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ctx = t.__tensor_flatten__()
        for name in names:
            yield from _walk(getattr(t, name), seen, depth, enter_modules=False)
    else:
        yield t
    for value in _attributes(t):  # Params4bit.quant_state, Int8Params.CB / SCB
        yield from _walk(value, seen, depth + 1, enter_modules=False)


def _attributes(obj: Any) -> list[Any]:
    """Instance attribute values (``__dict__`` and ``__slots__``); none for objects without either."""
    try:
        values = list(vars(obj).values())
    except TypeError:  # no __dict__
        values = []
    for cls in type(obj).__mro__:
        slots = getattr(cls, "__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            try:
                values.append(getattr(obj, slot))
            except Exception:  # an unset slot or a descriptor that refuses: nothing held there
                continue
    return values
