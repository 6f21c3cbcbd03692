"""JAQ: Q-Sched's reference-free joint alignment-quality objective, as pure functions of scorer outputs.

For calibration prompts p_1..p_P and the images x_1..x_P the quantized sampler draws for them,

    JAQ = mean_p A(x_p, p_p) + k * mean_p Q(x_p),      A = log(alignment score), k = 2 by default

(Q-Sched, arXiv 2509.01624: log CLIPScore + k * CLIP-IQA; an optional weight on the alignment term turns it
off for ablations). Higher is better; the search minimises
``-JAQ``. No full-precision image enters the formula: only the quantized model's own images are scored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiff.errors import QdiffError

LOG_EPS = 1e-6  # floor for log(alignment): a zero CLIP score (clamped negative cosine) stays finite


def alignment_term(scores: Tensor, log: bool = True, eps: float = LOG_EPS) -> Tensor:
    """(P,) alignment scores -> scalar: mean of ``log(max(s, eps))`` (or of ``s`` when ``log=False``)."""
    s = _check(scores, "alignment").double()
    return (s.clamp_min(eps).log() if log else s).mean()


def quality_term(scores: Tensor) -> Tensor:
    """(P,) no-reference quality scores (higher = better) -> scalar mean."""
    return _check(scores, "quality").double().mean()


def jaq(alignment: Tensor, quality: Tensor, k: float = 2.0, log_alignment: bool = True,
        alignment_weight: float = 1.0) -> Tensor:  # fmt: skip
    """Scalar float64 JAQ of (P,) alignment and (P,) quality scores for the same P images.

    ``alignment_weight`` scales the alignment term (0: quality only, for ablations; 1: Q-Sched's JAQ).
    """
    if alignment.shape != quality.shape:
        raise QdiffError(f"JAQ: alignment {tuple(alignment.shape)} and quality {tuple(quality.shape)} differ")
    return float(alignment_weight) * alignment_term(alignment, log_alignment) + float(k) * quality_term(quality)


def jaq_per_prompt(alignment: Tensor, quality: Tensor, k: float = 2.0, log_alignment: bool = True) -> Tensor:
    """(P,) per-image JAQ terms; their mean is :func:`jaq`."""
    a = _check(alignment, "alignment").double()
    a = a.clamp_min(LOG_EPS).log() if log_alignment else a
    return a + float(k) * _check(quality, "quality").double()


def _check(scores: Tensor, what: str) -> Tensor:
    if not isinstance(scores, Tensor) or scores.ndim != 1 or scores.numel() == 0:
        raise QdiffError(f"JAQ: {what} scores must be a non-empty 1-D tensor (one per image)")
    if not torch.isfinite(scores).all():
        raise QdiffError(f"JAQ: {what} scores contain NaN or inf")
    return scores
