"""Optional third-party packages that qdiff imports only when it uses them (and without their import notices).

diffusers imports bitsandbytes as soon as it is installed (``diffusers.quantizers.bitsandbytes.utils`` runs
``import bitsandbytes as bnb`` at import time, reached from every diffusers model class), and bitsandbytes logs
"Failed to load CPU gemm_4bit_forward from kernels-community" on import on AVX512-BF16 CPUs without the optional
``kernels`` package. qdiff needs bitsandbytes only for NF4 / int8 T5 text encoders, so:

* :func:`defer_bitsandbytes` imports diffusers' quantizer registry with bitsandbytes reported unavailable for the
  duration of that import, then gives diffusers a stand-in ``bnb`` that imports the real package on first use;
  diffusers' availability and version checks are left as they were, so its own bitsandbytes path still works.
* :func:`import_bitsandbytes` is the real import, with that one optional-kernel notice filtered out; every other
  record (warnings about missing native libraries, errors) passes.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class DropNotice(logging.Filter):
    """Drops log records whose message starts with ``prefix``; all others pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def import_bitsandbytes() -> types.ModuleType:
    """``import bitsandbytes`` without its optional CPU-kernel notice (ImportError when it is not installed)."""
    loaded = sys.modules.get("bitsandbytes")
    if loaded is not None:  # (a None entry means "not importable": import_module raises ImportError for it)
        return loaded
    logger = logging.getLogger(BNB_CPU_LOGGER)
    notice = DropNotice(BNB_NOTICE)
    logger.addFilter(notice)
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        logger.removeFilter(notice)


class LazyBitsandbytes(types.ModuleType):
    """Stands in for diffusers' module-level ``bnb``: the first attribute access imports bitsandbytes."""

    def __init__(self) -> None:
        super().__init__("bitsandbytes", "bitsandbytes, imported on first use (qdiff.utils.lazy_imports)")

    def __getattr__(self, name: str):
        return getattr(import_bitsandbytes(), name)


def defer_bitsandbytes() -> None:
    """Import diffusers' quantizers without importing bitsandbytes (a no-op once diffusers' quantizers are loaded,
    when bitsandbytes is not installed, or when this diffusers version has no such module-level import)."""
    if "diffusers.quantizers" in sys.modules or "bitsandbytes" in sys.modules:
        return
    try:
        import_utils = importlib.import_module("diffusers.utils.import_utils")
    except ImportError:
        return
    available = getattr(import_utils, "_bitsandbytes_available", None)
    if available is not True:
        return
    import_utils._bitsandbytes_available = False  # read by `if is_bitsandbytes_available(): import bitsandbytes`
    try:
        bnb_utils = importlib.import_module("diffusers.quantizers.bitsandbytes.utils")
    except ImportError:
        return
    finally:
        import_utils._bitsandbytes_available = available
    if not hasattr(bnb_utils, "bnb"):
        bnb_utils.bnb = LazyBitsandbytes()
