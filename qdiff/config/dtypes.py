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


def cpu_bf16_native(flags: frozenset[str]) -> bool:
    """Whether a CPU with these ``/proc/cpuinfo`` flags computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_compute_dtype(present: set, requested, flags: frozenset[str]):
    """The one floating dtype a CPU run uses for every float part of a pipeline.

    ``present``: the floating dtypes the pipeline's modules hold; ``requested``: the user's ``--dtype`` (or None).
    A request wins. Otherwise float32 pipelines stay float32, and anything holding float16 (which CPUs run slowly or
    not at all: diffusers refuses half pipelines on CPU) runs in bfloat16 where the CPU has native bf16 matmuls, else
    in float32.
    """
    import torch

    if requested is not None:
        return as_torch_dtype(requested)
    if present <= {torch.float32}:
        return torch.float32
    if torch.float16 in present:
        return torch.bfloat16 if cpu_bf16_native(flags) else torch.float32
    return next(iter(present)) if len(present) == 1 else torch.float32
