"""Shapes-domain metrics for generated images: attribute accuracy and Shapes-FID against real renders.

The bundled attribute classifier (``qdiff/models/shapes/scorers.py``) judges each image against the attributes
its caption names; its penultimate features give a Fréchet distance ("Shapes-FID") between the generated images
and fresh procedural renders of the same captions (attributes a caption leaves out are drawn at random, seeded).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from qdiff.errors import QdiffError

MIN_ATTRIBUTES = 2  # a prompt counts as Shapes-domain when it names at least shape and colour


def is_shapes_prompt_set(prompts: Sequence[str]) -> bool:
    """True when every prompt names (at least) a shape and a colour of the Shapes grammar."""
    from qdiff.models.shapes.data import parse_caption

    return bool(prompts) and all({"shape", "colour"} <= set(parse_caption(p)) for p in prompts)


def real_renders(prompts: Sequence[str], seed: int = 0) -> np.ndarray:
    """uint8 (N, 64, 64, 3): one procedural render per caption (unnamed attributes drawn with ``seed``)."""
    from qdiff.models.shapes import data

    rng = np.random.default_rng(seed)
    out = []
    for p in prompts:
        named = data.parse_caption(p)
        idx = [named.get(k, int(rng.integers(n))) for k, n in zip(data.ATTRIBUTE_KEYS, data.NUM_CLASSES)]
        out.append(data.render(data.Attributes(*idx), rng))
    return np.stack(out)


class ShapesJudge:
    """Attribute accuracy and Shapes-FID of images (B, 3, H, W) in [0, 1] for their captions."""

    def __init__(self, prompts: Sequence[str], seed: int = 0, weights_dir: str | None = None) -> None:
        from qdiff.models.shapes.scorers import AttributeClassifier, frechet_distance

        try:
            self.classifier = AttributeClassifier(weights_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise QdiffError(f"Shapes attribute classifier: cannot load its weights ({exc})") from None
        self._fd = frechet_distance
        self.prompts = list(prompts)
        self.real = real_renders(self.prompts, seed)
        self.real_features = self.classifier.features(self.real)

    def __call__(self, images: Tensor) -> dict[str, float]:
        if len(images) != len(self.prompts):
            raise QdiffError(f"Shapes metrics: {len(images)} images for {len(self.prompts)} prompts")
        acc = self.classifier.accuracy(images, self.prompts)
        out = {f"acc_{k}": v for k, v in acc.items()}
        out["shapes_fid"] = self._fd(self.classifier.features(images), self.real_features)
        return out

    def reference(self, seed: int = 1) -> dict[str, float]:
        """The same metrics for a second set of real renders: the ceiling of accuracy and the FID noise floor."""
        import torch

        other = real_renders(self.prompts, seed + 10_007)
        return self(torch.from_numpy(other).permute(0, 3, 1, 2).float() / 255.0)
