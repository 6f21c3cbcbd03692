"""Image feature extractors for Q-Sched's distribution anchor and validation guard (``qdiff.sched.guard``).

Protocol: ``extractor.features(images) -> Tensor (B, D)`` float64, with ``images`` float (B, 3, H, W) in [0, 1];
``extractor.name`` identifies it in logs. None of them looks at a prompt or at a full-precision model.

Extractors by spec string (:func:`make_features`):

* ``pixels`` — cheap image statistics (D = 57): per-channel mean and standard deviation, the 4x4 average-pooled
  image, per-channel mean gradient magnitude. No weights.
* ``shapes-clip[:DIR]`` — unit-norm image embeddings of the bundled Shapes CLIP (D = 128; also the JAQ alignment
  scorer's image tower).
* ``shapes-classifier[:DIR]`` — penultimate features of the bundled Shapes attribute classifier (D = 128). These
  are the features Shapes-FID is computed with (as Inception features would be for FID on a real model): a guard
  on them is reference-free, but it watches the evaluation's own feature space.
* ``open_clip:ARCH:PRETRAINED`` — unit-norm open_clip image embeddings (local weights, see ``scorers``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.errors import QdiffError


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str

    def features(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [0, 1] -> (B, D) float64
        ...


def _check(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise QdiffError(f"features: images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', images)}")
    return images.detach().float().cpu().clamp(0, 1)


def pixel_statistics(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 57) float64: channel mean (3), std (3), 4x4 pooled image (48), grad. mag. (3)."""
    x = _check(images).double()
    mean = x.mean(dim=(2, 3))  # (B, 3)
    std = x.std(dim=(2, 3), unbiased=False)  # (B, 3)
    pooled = F.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 48)
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(2, 3))  # (B, 3)
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(2, 3))
    return torch.cat([mean, std, pooled, gx + gy], dim=1)


class PixelFeatures:
    name = "pixels"

    def features(self, images: Tensor) -> Tensor:
        return pixel_statistics(images)


class ShapesClipFeatures:
    """Unit-norm image embeddings (B, 128) of the bundled Shapes CLIP."""

    def __init__(self, weights_dir: str | None = None) -> None:
        from qdiff.models.shapes.scorers import ClipScorer

        try:
            self.model = ClipScorer(weights_dir or None)
        except (OSError, ValueError, KeyError) as exc:
            raise QdiffError(f"features shapes-clip: cannot load its weights ({exc})") from None
        self.name = "shapes-clip" + (f":{weights_dir}" if weights_dir else "")

    def features(self, images: Tensor) -> Tensor:
        return self.model.embed_images(_check(images)).double()


class ShapesClassifierFeatures:
    """Penultimate features (B, 128) of the bundled Shapes attribute classifier (Shapes-FID's feature space)."""

    def __init__(self, weights_dir: str | None = None) -> None:
        from qdiff.models.shapes.scorers import AttributeClassifier

        try:
            self.model = AttributeClassifier(weights_dir or None)
        except (OSError, ValueError, KeyError) as exc:
            raise QdiffError(f"features shapes-classifier: cannot load its weights ({exc})") from None
        self.name = "shapes-classifier" + (f":{weights_dir}" if weights_dir else "")

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.model.features(_check(images)).double()


class OpenClipFeatures:
    """Unit-norm open_clip image embeddings (B, D); weights resolved as for the open_clip scorer (never downloaded)."""

    def __init__(self, arg: str) -> None:
        from qdiff.sched.scorers import OpenClipScorer, clip_preprocess

        arch, _, pretrained = arg.partition(":")
        self.scorer = OpenClipScorer(arch or "ViT-B-32", pretrained or None)
        self._pre = clip_preprocess
        self.name = "open_clip:" + self.scorer.name.split(":", 1)[1]

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        s = self.scorer
        x = self._pre(_check(images), s.size, s.mean, s.std).to(s.device)
        return F.normalize(s.model.encode_image(x).double().cpu(), dim=-1)


FEATURES: Mapping[str, Callable[[str], FeatureExtractor]] = MappingProxyType(
    {
        "pixels": lambda arg: PixelFeatures(),
        "shapes-clip": lambda arg: ShapesClipFeatures(arg or None),
        "shapes-classifier": lambda arg: ShapesClassifierFeatures(arg or None),
        "open_clip": OpenClipFeatures,
    }
)


def make_features(spec: str | FeatureExtractor) -> FeatureExtractor:
    """A feature extractor from ``"family[:arg]"`` (see the module doc) or a ready object (returned as is)."""
    if not isinstance(spec, str):
        if not isinstance(spec, FeatureExtractor):
            raise QdiffError(f"feature extractor {spec!r} has no name/features(images)")
        return spec
    family, _, arg = spec.partition(":")
    if family not in FEATURES:
        raise QdiffError(f"unknown feature extractor {spec!r}; families: {', '.join(sorted(FEATURES))}")
    return FEATURES[family](arg)
