"""Optional third-party packages that qdiff imports only when it uses them (and without their import notices).

diffusers imports bitsandbytes as soon as it is installed (``diffusers.quantizers.bitsandbytes.utils`` runs
``import bitsandbytes as bnb`` at import time, reached from every diffusers model class), and bitsandbytes logs
"Failed to load CPU gemm_4bit_forward from kernels-community" on import on AVX512-BF16 CPUs when Hugging Face's
``kernels`` package cannot fetch that kernel (not installed, or offline: then ``kernels`` itself first logs "Skipping
publisher trust check for 'kernels-community/quantization-bitsandbytes' ..."). qdiff needs bitsandbytes only for NF4
/ int8 T5 text encoders, so:

* :func:`defer_bitsandbytes` imports diffusers' quantizer registry with bitsandbytes reported unavailable for the
  duration of that import, then gives diffusers a stand-in ``bnb`` that imports the real package on first use;
  diffusers' availability and version checks are left as they were, so its own bitsandbytes path still works.
* :func:`import_bitsandbytes` is the real import, with those optional-kernel notices (``BNB_NOTICES``) filtered out;
  every other record (warnings about missing native libraries, errors) passes.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
# (logger, message prefix) of the notices ``import bitsandbytes`` prints about its optional hub kernel on CPU.
BNB_NOTICES: tuple[tuple[str, str], ...] = (
    (BNB_CPU_LOGGER, BNB_NOTICE),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
)


class DropNotice(logging.Filter):
    """Drops log records whose message starts with ``prefix``; all others pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def import_bitsandbytes() -> types.ModuleType:
    """``import bitsandbytes`` without its optional CPU-kernel notices (ImportError when it is not installed)."""
    loaded = sys.modules.get("bitsandbytes")
    if loaded is not None:  # (a None entry means "not importable": import_module raises ImportError for it)
        return loaded
    with dropping_notices(BNB_NOTICES):
        return importlib.import_module("bitsandbytes")


@contextmanager
def dropping_notices(notices: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """Drop the records of each (logger, message prefix) while the block runs; every other record passes."""
    filters = [(logging.getLogger(name), DropNotice(prefix)) for name, prefix in notices]
    for logger, notice in filters:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger, notice in filters:
            logger.removeFilter(notice)


class LazyBitsandbytes(types.ModuleType):
    """Stands in for diffusers' module-level ``bnb``: the first attribute access imports bitsandbytes."""

    def __init__(self) -> None:
        super().__init__("bitsandbytes", "bitsandbytes, imported on first use (qdiff.utils.lazy_imports)")

    def __getattr__(self, name: str):
        return getattr(import_bitsandbytes(), name)


# Notices printed while diffusers imports its quantizer registry when torchao is installed (diffusers 0.42.1 with
# torchao 0.18: torchao's tensor classes moved, and torchao registers Enum constants that torch 2.14 deprecates).
# They say nothing about a qdiff run and are dropped during that one import only.
IMPORT_NOTICES: tuple[tuple[str, str], ...] = (
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    ("torch.utils._pytree", "<enum "),
)


def defer_bitsandbytes() -> None:
    """Import diffusers' quantizers without importing bitsandbytes and without the import notices above (a no-op
    once diffusers' quantizers are loaded)."""
    if "diffusers.quantizers" in sys.modules:
        return
    with dropping_notices(IMPORT_NOTICES):
        _import_quantizers_without_bnb()


def _import_quantizers_without_bnb() -> None:
    if "bitsandbytes" in sys.modules:
        importlib.import_module("diffusers.quantizers")
        return
    try:
        import_utils = importlib.import_module("diffusers.utils.import_utils")
    except ImportError:
        return
    available = getattr(import_utils, "_bitsandbytes_available", None)
    if available is not True:
        importlib.import_module("diffusers.quantizers")
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
