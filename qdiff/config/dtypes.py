"""Torch dtype names as users write them, and the keyword diffusers takes them with."""

from __future__ import annotations

from qdiff.errors import QdiffError

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}  # fmt: skip


def as_torch_dtype(dtype):
    """``None``, a ``torch.dtype`` or a name such as ``"float16"`` / ``"bf16"`` -> ``torch.dtype | None``."""
    if dtype is None:
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise QdiffError(f"unknown dtype {dtype!r}; use one of: float32, float16, bfloat16")
    return getattr(torch, name)


def dtype_kwargs(torch_dtype) -> dict:
    """diffusers >= 0.36 takes ``dtype=`` (``torch_dtype=`` is deprecated); older versions take ``torch_dtype=``."""
    if torch_dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": torch_dtype}
    return {"dtype": torch_dtype}
