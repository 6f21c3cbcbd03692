"""The C allocator, as the CPU backends see it: bytes in use (measured) and handing freed pages back to the OS.

Torch's CPU tensors and oneDNN's prepacked weights come from the C allocator (glibc ``malloc``). Two uses:

* :func:`in_use` measures the bytes held (``mallinfo2``: heap chunks in use plus mmapped chunks), for
  ``qdiff inspect --resident`` and the tests that check one resident copy per weight;
* :func:`give_back` returns free heap pages to the OS (``malloc_trim``). A layer that releases its codes after
  prepacking them frees a hole in the middle of the heap, which glibc keeps resident; over a whole SDXL UNet those
  holes grew the first call's peak by ~1 GiB (measured) until they were handed back as they appeared.

Both are no-ops (None / False) where the C library is not glibc (>= 2.33 for ``mallinfo2``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

__all__ = ["in_use", "give_back"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def _libc_function(name: str, restype: Any) -> Callable | None:
    try:
        fn = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.restype = restype
    return fn


# libc functions, looked up once at import (constants, not state)
_MALLINFO2 = _libc_function("mallinfo2", _MallInfo2)
_MALLOC_TRIM = _libc_function("malloc_trim", ctypes.c_int)


def in_use() -> int | None:
    """Bytes the C allocator has handed out and not got back, or None where that cannot be read."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def give_back() -> bool:
    """Hand free heap pages back to the OS (``malloc_trim(0)``); True when some were."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False
