"""Paired bootstrap over prompts and seeds for differences of set statistics (Fréchet distance) and of means.

Images come in a grid: prompt ``p`` drawn with seed slot ``s`` (every prompt with every slot). Two samplers are
compared *paired*: the same prompts and seeds for both. One bootstrap replicate draws the prompts with
replacement and, independently, the seed slots with replacement, and takes every (prompt, slot) pair of the two
draws (a two-way bootstrap; with one slot it is the plain bootstrap over prompts). The same replicate indexes both
samplers (and the reference set of a Fréchet distance), so the statistic is the paired difference.

Intervals are percentile intervals at ``level`` (0.95: the 2.5% and 97.5% quantiles of the replicates).
The Fréchet distances of all replicates are computed in one batch, float64, through the identity
``tr((S_a^1/2 S_b S_a^1/2)^1/2) = ||A B^T||_* / sqrt((m-1)(n-1))`` for centred feature matrices A (m, D), B (n, D)
(singular values of ``R_a R_b^T`` after QR, as square roots of the eigenvalues of its Gram matrix), which is
exact for any m, n and D.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qdiff.errors import QdiffError


@dataclass(frozen=True)
class Interval:
    """A paired difference: its value on the full sample and the bootstrap percentile interval."""

    value: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level}


def bootstrap_indices(prompt_ids: Sequence[int], seed_ids: Sequence[int], n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, P*S) image indices: per replicate every pair of P prompts and S seed slots drawn with replacement.

    ``prompt_ids[i]`` / ``seed_ids[i]``: the prompt and seed slot of image ``i``; every prompt must have every slot
    exactly once (a full grid).
    """
    p_ids, s_ids = np.asarray(prompt_ids), np.asarray(seed_ids)
    if p_ids.shape != s_ids.shape or p_ids.ndim != 1 or p_ids.size == 0:
        raise QdiffError(f"bootstrap: {p_ids.shape} prompt ids for {s_ids.shape} seed ids")
    prompts, slots = np.unique(p_ids), np.unique(s_ids)
    grid = np.full((prompts.size, slots.size), -1)
    grid[np.searchsorted(prompts, p_ids), np.searchsorted(slots, s_ids)] = np.arange(p_ids.size)
    if (grid < 0).any() or p_ids.size != grid.size:
        raise QdiffError("bootstrap: every prompt needs every seed slot exactly once (a full prompts x seeds grid)")
    if n_boot < 1:
        raise QdiffError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    rows = rng.integers(prompts.size, size=(n_boot, prompts.size))
    cols = rng.integers(slots.size, size=(n_boot, slots.size))
    return grid[rows[:, :, None], cols[:, None, :]].reshape(n_boot, -1)


def batched_frechet(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fréchet distances (B,) between Gaussians fitted to a[k] (m, D) and b[k] (n, D), float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise QdiffError(f"Fréchet distance: feature batches {tuple(a.shape)} and {tuple(b.shape)} do not match")
    return _frechet(_moments(a), _moments(b))


def _moments(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(mean (B, D), R of the centred rows' QR (B, k, D), trace of the covariance (B,), m) of a batch (B, m, D)."""
    m = a.shape[1]
    if m < 2:
        raise QdiffError(f"Fréchet distance: need >= 2 samples per set, got {m}")
    mu = a.mean(1)
    centred = a - mu[:, None]
    return mu, torch.linalg.qr(centred, mode="r")[1], centred.pow(2).sum((1, 2)) / (m - 1), m


def _frechet(ma, mb) -> torch.Tensor:
    (mu_a, ra, tr_a, m), (mu_b, rb, tr_b, n) = ma, mb
    cross = ra @ rb.transpose(1, 2)  # singular values of A B^T are those of R_a R_b^T
    gram = cross @ cross.transpose(1, 2) if cross.shape[1] <= cross.shape[2] else cross.transpose(1, 2) @ cross
    nuclear = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum(-1)
    return (mu_a - mu_b).pow(2).sum(-1) + tr_a + tr_b - 2 * nuclear / ((m - 1) * (n - 1)) ** 0.5


def _interval(value: float, samples: np.ndarray, level: float) -> Interval:
    if not 0 < level < 1:
        raise QdiffError(f"bootstrap: level must be in (0, 1), got {level}")
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(low), float(high), float(level))


def paired_fd_difference(x, y, ref, prompt_ids: Sequence[int], seed_ids: Sequence[int], n_boot: int = 1000,
                         seed: int = 0, level: float = 0.95, chunk: int = 250) -> Interval:  # fmt: skip
    """``FD(x, ref) - FD(y, ref)`` and its paired bootstrap interval; row ``i`` of x, y and ref belongs to image
    ``i`` of the grid (x and y: the two samplers' features; ref: the reference set, paired by prompt and slot)."""
    return paired_fd(x, y, ref, prompt_ids, seed_ids, n_boot, seed, level, chunk)[0]


def paired_fd(x, y, ref, prompt_ids: Sequence[int], seed_ids: Sequence[int], n_boot: int = 1000, seed: int = 0,
              level: float = 0.95, chunk: int = 250) -> tuple[Interval, float]:  # fmt: skip
    """(:func:`paired_fd_difference`, ``FD(y, ref)``): the interval and the point FD of the ``y`` sample."""
    x, y, ref = (torch.as_tensor(v, dtype=torch.float64) for v in (x, y, ref))
    if not x.shape == y.shape == ref.shape or x.ndim != 2 or x.shape[0] != len(prompt_ids):
        raise QdiffError(f"bootstrap: feature sets {tuple(x.shape)}, {tuple(y.shape)}, {tuple(ref.shape)} for "
                         f"{len(prompt_ids)} images")  # fmt: skip
    idx = torch.from_numpy(bootstrap_indices(prompt_ids, seed_ids, n_boot, seed))
    fd_y = batched_frechet(y[None], ref[None])
    value = float(batched_frechet(x[None], ref[None]) - fd_y)
    parts = []
    for i in idx.split(chunk):
        r = _moments(ref[i])  # shared by both distances
        parts.append(_frechet(_moments(x[i]), r) - _frechet(_moments(y[i]), r))
    return _interval(value, torch.cat(parts).numpy(), level), float(fd_y[0])


def paired_mean_difference(a, b, prompt_ids: Sequence[int], seed_ids: Sequence[int], n_boot: int = 1000,
                           seed: int = 0, level: float = 0.95) -> Interval:  # fmt: skip
    """``mean(a - b)`` over the images and its paired bootstrap interval (a, b: one value per image)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or d.size != len(prompt_ids):
        raise QdiffError(f"bootstrap: {d.shape} values for {len(prompt_ids)} images")
    idx = bootstrap_indices(prompt_ids, seed_ids, n_boot, seed)
    return _interval(float(d.mean()), d[idx].mean(1), level)
