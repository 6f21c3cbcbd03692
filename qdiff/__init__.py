"""qdiff: post-training quantization for few-step text-to-image diffusion pipelines.

Public API (imported lazily so that ``import qdiff`` stays cheap and never touches CUDA, Triton
or the network)::

    import qdiff
    pipe = qdiff.quantize(pipe, "w8a8")      # recipe name, path, Recipe or Plan
    qdiff.save(pipe, "out/")
    pipe = qdiff.load("out/")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Recipe", "Plan", "QdiffError", "calibrate", "quantize", "save", "load", "load_pipeline", "fit_schedule",
    "evaluate", "export_openvino", "__version__",
]  # fmt: skip

_LAZY = {
    "Recipe": ("qdiff.config.recipe", "Recipe"),
    "Plan": ("qdiff.config.plan", "Plan"),
    "QdiffError": ("qdiff.errors", "QdiffError"),
    "calibrate": ("qdiff.api", "calibrate"),
    "quantize": ("qdiff.api", "quantize"),
    "save": ("qdiff.api", "save"),
    "load": ("qdiff.api", "load"),
    "fit_schedule": ("qdiff.api", "fit_schedule"),
    "load_pipeline": ("qdiff.export.resolve", "load_pipeline"),
    "evaluate": ("qdiff.eval.run", "evaluate"),
    "export_openvino": ("qdiff.engines.openvino.export", "export_openvino"),
}

if TYPE_CHECKING:  # pragma: no cover
    from qdiff.api import calibrate, fit_schedule, load, quantize, save
    from qdiff.config.plan import Plan
    from qdiff.config.recipe import Recipe
    from qdiff.errors import QdiffError
    from qdiff.eval.run import evaluate
    from qdiff.export.resolve import load_pipeline


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qdiff' has no attribute {name!r}")
