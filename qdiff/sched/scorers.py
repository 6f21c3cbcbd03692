"""Pluggable image scorers for the JAQ loss. Every scorer returns higher-is-better scores.

Protocol: ``scorer.score(images, prompts) -> Tensor (B,)`` with ``images`` float (B, 3, H, W) in [0, 1]
and ``prompts`` a list of B strings (quality scorers ignore them). ``scorer.name`` identifies it in
logs and cache keys.

Scorers by spec string (:func:`make_scorer`):

* ``open_clip:ARCH[:PRETRAINED]`` — CLIP score ``scale * max(cos(img, txt), 0)`` (torchmetrics'
  convention, scale 100) with any open_clip architecture. PRETRAINED is a local ``.safetensors`` file or
  an open_clip tag whose safetensors weights are already in the Hugging Face cache; nothing is
  downloaded, and pickle checkpoints (``.bin``/``.pt``) are refused.
* ``pyiqa:METRIC`` — a pyiqa no-reference metric (``clipiqa``, ``musiq`` need weights in pyiqa's cache;
  ``piqe`` and ``entropy`` work offline). Lower-is-better metrics are negated.
* ``shapes-clip[:DIR]`` / ``shapes-quality[:DIR]`` — the bundled Shapes scorers
  (``qdiff/models/shapes/scorers.py``): the small CLIP trained on Shapes (``100 * cos``, clamped at 0 like
  ``open_clip``) and the clean-vs-degraded quality logit. They work offline; ``DIR`` overrides the weights
  folder (default: the weights shipped in the package).

Callers with their own scorer pass the object itself wherever a spec string is accepted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.errors import QdiffError


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:  # (B, 3, H, W) in [0, 1] -> (B,)
        ...


def _check_images(images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise QdiffError(f"scorer: images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise QdiffError(f"scorer: {images.shape[0]} images but {len(prompts)} prompts")
    return images.float().clamp(0, 1)


# ---- open_clip CLIP score --------------------------------------------------------------------------
def clip_preprocess(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(B,3,H,W) in [0,1] -> resize shortest side to ``size`` (bicubic, antialiased), centre crop, normalise."""
    h, w = images.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd


def clip_score_from_features(img: Tensor, txt: Tensor, scale: float = 100.0) -> Tensor:
    """(B, D) image and text embeddings -> (B,) ``scale * max(cos, 0)``."""
    cos = F.cosine_similarity(img.double(), txt.double(), dim=-1)
    return (scale * cos.clamp_min(0)).float()


class OpenClipScorer:
    """CLIP score with an open_clip model. ``pretrained=None`` needs ``allow_random=True`` (tests only)."""

    def __init__(self, arch: str = "ViT-B-32", pretrained: str | None = None, *, allow_random: bool = False,
                 scale: float = 100.0, device: str = "cpu") -> None:  # fmt: skip
        try:
            import open_clip
        except ImportError as exc:
            raise QdiffError(
                "open_clip is not installed; install the scorers extra: pip install 'qdiff[scorers]'"
            ) from exc
        if arch not in open_clip.list_models():
            raise QdiffError(
                f"open_clip architecture {arch!r} is unknown (e.g. {', '.join(open_clip.list_models()[:5])})"
            )
        if pretrained is None and not allow_random:
            raise QdiffError(f"open_clip:{arch}: no weights given; pass a local .safetensors path or a cached tag")
        kwargs = {}
        if pretrained is not None:
            path, quick_gelu = _resolve_clip_weights(open_clip, arch, pretrained)
            kwargs = {"pretrained": path, "force_quick_gelu": quick_gelu}
        try:
            self.model = open_clip.create_model(arch, device=device, **kwargs).eval()
            self.tokenizer = open_clip.get_tokenizer(arch)
        except (RuntimeError, OSError, ValueError) as exc:
            raise QdiffError(f"open_clip:{arch}: cannot build the model offline ({_one_line(exc)})") from None
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = self.model.visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.scale = float(scale)
        self.device = device
        self.name = f"open_clip:{arch}:{pretrained if pretrained is None else Path(str(pretrained)).name}"

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        x = clip_preprocess(_check_images(images, prompts), self.size, self.mean, self.std).to(self.device)
        img = self.model.encode_image(x)
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))
        return clip_score_from_features(img, txt, self.scale).cpu()


def _resolve_clip_weights(open_clip, arch: str, pretrained: str) -> tuple[str, bool]:
    """A local safetensors path for ``pretrained`` (file path or cached tag) and whether it needs QuickGELU."""
    path = Path(os.path.expanduser(pretrained))
    if path.suffix or os.sep in pretrained:
        if not path.is_file():
            raise QdiffError(f"open_clip weights {path} not found")
        if path.suffix != ".safetensors":
            raise QdiffError(f"open_clip weights {path}: only .safetensors is loaded (qdiff never unpickles)")
        return str(path), "quickgelu" in arch.lower()
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)[:8])
        raise QdiffError(f"open_clip:{arch}: unknown pretrained tag {pretrained!r} (known: {tags})")
    repo = str(cfg.get("hf_hub", "")).strip("/")
    cached = None
    if repo:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "open_clip_model.safetensors")
        cached = hit if isinstance(hit, str) else None
    if cached is None:
        raise QdiffError(
            f"open_clip:{arch}:{pretrained}: safetensors weights are not in the local cache and qdiff does not "
            f"download; put open_clip_model.safetensors of {repo or 'the model'} on disk and pass its path"
        )
    return cached, bool(cfg.get("quick_gelu", False))


# ---- pyiqa no-reference metrics --------------------------------------------------------------------
class PyiqaScorer:
    """A pyiqa no-reference metric; negated when pyiqa marks it lower-is-better (e.g. PIQE)."""

    def __init__(self, metric: str, device: str = "cpu") -> None:
        try:
            import pyiqa
        except ImportError as exc:
            raise QdiffError(
                "pyiqa is not installed; install the scorers extra: pip install 'qdiff[scorers]'"
            ) from exc
        if metric not in pyiqa.list_models(metric_mode="NR"):
            raise QdiffError(f"pyiqa:{metric}: not a pyiqa no-reference metric")
        try:
            with _no_downloads():
                self.metric = pyiqa.create_metric(metric, device=device, as_loss=False)
        except Exception as exc:  # noqa: BLE001 - pyiqa raises URLError/RuntimeError/... when weights are absent
            raise QdiffError(
                f"pyiqa:{metric}: cannot build the metric offline (its weights are not in pyiqa's cache; "
                f"qdiff does not download): {_one_line(exc)}"
            ) from None
        self.sign = -1.0 if self.metric.lower_better else 1.0
        self.device = device
        self.name = f"pyiqa:{metric}"

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        out = self.metric(_check_images(images).to(self.device))
        return (self.sign * out.reshape(images.shape[0], -1)[:, 0]).float().cpu()


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """pyiqa fetches missing weights from URLs (its download helper, and urllib for CLIP backbones); refuse both."""
    from unittest import mock

    def refuse(url, *args, **kwargs):
        raise OSError(f"download of {getattr(url, 'full_url', url)} refused (offline)")

    with (
        mock.patch("pyiqa.utils.download_util.download_url_to_file", refuse),
        mock.patch("urllib.request.urlopen", refuse),
    ):
        yield


# ---- registry ----------------------------------------------------------------------------------------
class ShapesClipScorer:
    """CLIP score of the bundled Shapes CLIP: ``100 * max(cos(img, txt), 0)`` (same convention as open_clip)."""

    def __init__(self, weights_dir: str | None = None) -> None:
        from qdiff.models.shapes.scorers import ClipScorer

        self.model = _load_shapes(ClipScorer, "shapes-clip", weights_dir)
        self.name = "shapes-clip" + (f":{weights_dir}" if weights_dir else "")

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        x = _check_images(images, prompts)
        return self.model.score(x, list(prompts)).clamp_min(0).float()


class ShapesQualityScorer:
    """Bundled Shapes quality score: logit of the clean-vs-degraded classifier (higher = cleaner)."""

    def __init__(self, weights_dir: str | None = None) -> None:
        from qdiff.models.shapes.scorers import QualityScorer

        self.model = _load_shapes(QualityScorer, "shapes-quality", weights_dir)
        self.name = "shapes-quality" + (f":{weights_dir}" if weights_dir else "")

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return self.model.score(_check_images(images)).float()


def _load_shapes(cls, name: str, weights_dir: str | None):
    try:
        return cls(weights_dir or None)
    except (OSError, ValueError, KeyError) as exc:
        where = weights_dir or "the package (qdiff/models/shapes/weights)"
        raise QdiffError(f"scorer {name}: cannot load its weights from {where} ({_one_line(exc)})") from None


def _open_clip(arg: str) -> Scorer:
    arch, _, pretrained = arg.partition(":")
    return OpenClipScorer(arch or "ViT-B-32", pretrained or None)


FACTORIES: Mapping[str, Callable[[str], Scorer]] = MappingProxyType(
    {
        "open_clip": _open_clip,
        "pyiqa": lambda arg: PyiqaScorer(arg or "piqe"),
        "shapes-clip": lambda arg: ShapesClipScorer(arg or None),
        "shapes-quality": lambda arg: ShapesQualityScorer(arg or None),
    }
)


def make_scorer(spec: str | Scorer, extra: Mapping[str, Callable[[str], Scorer]] | None = None) -> Scorer:
    """A scorer from ``"family[:arg]"`` (see the module doc) or a ready scorer object (returned as is)."""
    if not isinstance(spec, str):
        if not isinstance(spec, Scorer):
            raise QdiffError(f"scorer {spec!r} has no name/score(images, prompts)")
        return spec
    family, _, arg = spec.partition(":")
    table = {**FACTORIES, **(extra or {})}
    if family not in table:
        raise QdiffError(f"unknown scorer {spec!r}; families: {', '.join(sorted(table))}")
    return table[family](arg)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
