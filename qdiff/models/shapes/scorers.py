"""Offline scorers for the Shapes domain: attribute classifier (+ Shapes-FID features), CLIP score, quality score.

Public methods take images as a list of PIL images, a uint8 array (N, H, W, 3), or a float tensor
(N, 3, 64, 64) in [0, 1] (what ``pipeline(..., output_type="pt")`` returns). Weights load from
``qdiff/models/shapes/weights/`` by default (``classifier.safetensors`` + ``classifier.json``, ``clip/``,
``quality.safetensors`` + ``quality.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .data import ATTRIBUTE_KEYS, parse_caption
from .models import AttributeNet

WEIGHTS_DIR = Path(__file__).parent / "weights"


def to_model_input(images: Any, size: int = 64) -> torch.Tensor:
    """PIL list / uint8 (N, H, W, 3) / float (N, 3, H, W) in [0, 1] -> float (N, 3, 64, 64) in [-1, 1]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    else:
        x = images.detach().float().cpu()
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.clamp(0, 1) * 2 - 1


def load_net(stem: Path) -> AttributeNet:
    """Load an :class:`AttributeNet` from ``stem.safetensors`` + ``stem.json`` (eval mode)."""
    cfg = json.loads(stem.with_suffix(".json").read_text())
    net = AttributeNet(tuple(cfg["widths"]), cfg["feat_dim"], tuple(cfg["heads"]))
    net.load_state_dict({k: v.float() for k, v in load_file(str(stem.with_suffix(".safetensors"))).items()})
    return net.eval()


class AttributeClassifier:
    """Predicts (shape, colour, size, position, background) of a render; features for Shapes-FID."""

    def __init__(self, weights_dir: str | Path | None = None, net: AttributeNet | None = None) -> None:
        self.net = net if net is not None else load_net(Path(weights_dir or WEIGHTS_DIR) / "classifier")

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Images -> long (N, 5) class indices in :data:`ATTRIBUTE_KEYS` order."""
        x = to_model_input(images)
        out = []
        for i in range(0, len(x), batch_size):
            out.append(torch.stack([h.argmax(-1) for h in self.net(x[i : i + batch_size])], dim=1))
        return torch.cat(out)

    @torch.no_grad()
    def features(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Images -> float (N, feat_dim) penultimate features."""
        x = to_model_input(images)
        return torch.cat([self.net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    def accuracy(self, images: Any, targets: torch.Tensor | list[str]) -> dict[str, float]:
        """Per-attribute accuracy against labels (N, 5) or captions (only attributes a caption names count)."""
        pred = self.predict(images)
        if isinstance(targets, torch.Tensor):
            return {k: float((pred[:, i] == targets[:, i]).float().mean()) for i, k in enumerate(ATTRIBUTE_KEYS)}
        hits: dict[str, list[float]] = {k: [] for k in ATTRIBUTE_KEYS}
        for p, cap in zip(pred, targets):
            for k, v in parse_caption(cap).items():
                hits[k].append(float(p[ATTRIBUTE_KEYS.index(k)] == v))
        return {k: float(np.mean(v)) for k, v in hits.items() if v}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D) (float64, eigen sqrt)."""
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s1)
    sq1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sq1 @ s2 @ sq1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


class ClipScorer:
    """Small CLIP trained on Shapes: ``score`` = 100 * cosine(image, text) like CLIPScore (no clamping)."""

    def __init__(self, weights_dir: str | Path | None = None) -> None:
        from transformers import CLIPModel

        from .pipeline import quiet_transformers_loading
        from .tokenizer import load_tokenizer

        d = Path(weights_dir or WEIGHTS_DIR)
        with quiet_transformers_loading():
            self.model = CLIPModel.from_pretrained(str(d / "clip"), local_files_only=True).eval()
        self.tokenizer = load_tokenizer(d / "tokenizer")

    @torch.no_grad()
    def embed_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> unit-norm (N, D) embeddings."""
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        e = self.model.get_text_features(input_ids=ids)
        e = e if torch.is_tensor(e) else e.pooler_output
        return torch.nn.functional.normalize(e, dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Any) -> torch.Tensor:
        """Images -> unit-norm (N, D) embeddings."""
        e = self.model.get_image_features(pixel_values=to_model_input(images))
        e = e if torch.is_tensor(e) else e.pooler_output
        return torch.nn.functional.normalize(e, dim=-1)

    def score(self, images: Any, captions: list[str]) -> torch.Tensor:
        """Per-pair CLIP score (N,), 100 * cosine similarity."""
        return 100 * (self.embed_images(images) * self.embed_text(captions)).sum(-1)


class QualityScorer:
    """Reference-free quality: logit of a small CNN trained to tell clean renders from degraded ones (higher =
    better; > 0 means judged clean)."""

    def __init__(self, weights_dir: str | Path | None = None, net: AttributeNet | None = None) -> None:
        self.net = net if net is not None else load_net(Path(weights_dir or WEIGHTS_DIR) / "quality")

    @torch.no_grad()
    def score(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Images -> float (N,) quality logits."""
        x = to_model_input(images)
        return torch.cat([self.net(x[i : i + batch_size])[0][:, 0] for i in range(0, len(x), batch_size)])
