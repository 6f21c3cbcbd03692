"""The bundled Shapes text-to-image model: procedural data, tokenizer, pipeline, scorers and training.

Submodules import torch/diffusers lazily where possible; use::

    from qdiff.models.shapes.pipeline import shapes_pipeline
    pipe = shapes_pipeline()                       # StableDiffusionPipeline from the shipped weights
    images = pipe(["a large red circle on the left on a black background"], num_inference_steps=4,
                  guidance_scale=3.0).images
"""

from __future__ import annotations

from typing import Any

__all__ = ["shapes_pipeline", "DEFAULT_SAMPLER"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
