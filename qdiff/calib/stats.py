"""Per-layer, per-step activation statistics with bounded memory, and the ranges observers derive from them.

:class:`LayerStats` keeps, for every sampling step ``s`` (the index of the denoiser call within one
pipeline call): the min and max of the layer input, the number of values, and a histogram of ``bins``
equal-width bins over a symmetric range ``[-R, R]``. ``R`` is a power of two that doubles when a value
falls outside (pairs of bins are merged into the middle half, so no count is lost). It also folds every
update into a running EMA of the batch min/max in arrival order (MixDQ's EMA observer, momentum 0.95).
Memory per layer is ``O(steps * bins)`` whatever the number of prompts.

:class:`CapturedStats` is the artifact of the capture stage; it saves to ``ranges.safetensors`` (tensors)
plus ``ranges.json`` (everything else) and loads back without pickle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from qdiff.errors import QdiffError
from qdiff.numerics.primitives import compute_qparams, dequantize, quantize
from qdiff.utils.finite import check_range
from qdiff.utils.perms import usual_mkstemp

STATS_VERSION = 1
STATS_TENSORS = "ranges.safetensors"
STATS_JSON = "ranges.json"


class LayerStats:
    """Statistics of one layer's input; ``update(x, step)`` folds in a batch (any shape, any float dtype)."""

    def __init__(self, bins: int = 1024, momentum: float = 0.95) -> None:
        if bins < 4 or bins % 4:
            raise ValueError(f"bins must be a multiple of 4, got {bins}")
        self.bins, self.momentum = int(bins), float(momentum)
        self.step_min: list[float] = []
        self.step_max: list[float] = []
        self.step_count: list[int] = []
        self.hist = torch.zeros(0, self.bins, dtype=torch.int64)  # (steps, bins)
        self.radius = 0.0  # R: histogram covers [-R, R]; 0 until a non-zero value is seen
        self.ema: tuple[float, float] | None = None
        self.numel_per_sample = 0  # input elements per sample of one denoiser call (activation size weight)
        self.num_updates = 0

    # ---- accumulation ----------------------------------------------------------------------------------------
    def _grow_steps(self, step: int) -> None:
        while len(self.step_min) <= step:
            self.step_min.append(math.inf)
            self.step_max.append(-math.inf)
            self.step_count.append(0)
        if self.hist.shape[0] <= step:
            pad = torch.zeros(step + 1 - self.hist.shape[0], self.bins, dtype=torch.int64)
            self.hist = torch.cat([self.hist, pad])

    def _widen(self, amax: float) -> None:
        if self.radius == 0.0:  # R > amax strictly: no value sits on the upper edge, where it would be clamped
            self.radius = 2.0 ** (math.floor(math.log2(amax)) + 1) if amax > 0 else 0.0
            return
        while amax >= self.radius:  # merge bin pairs into the middle half of a range twice as wide
            merged = self.hist.reshape(self.hist.shape[0], self.bins // 2, 2).sum(-1)
            quarter = self.bins // 4
            self.hist = torch.zeros_like(self.hist)
            self.hist[:, quarter : quarter + self.bins // 2] = merged
            self.radius *= 2.0

    @torch.no_grad()
    def update(self, x: Tensor, step: int = 0) -> None:
        """Fold in a batch; :class:`~qdiff.utils.finite.NonFiniteError` (nothing recorded) when it holds NaN / Inf."""
        if x.numel() == 0:
            return
        xf = x.detach().float().reshape(-1)
        mn, mx = (float(v) for v in torch.aminmax(xf))
        check_range(xf, mn, mx)  # NonFiniteError before any state changes (a NaN range poisons every observer)
        self._grow_steps(step)
        self.step_min[step] = min(self.step_min[step], mn)
        self.step_max[step] = max(self.step_max[step], mx)
        self.step_count[step] += xf.numel()
        if self.ema is None:
            self.ema = (mn, mx)
        else:
            m = self.momentum
            self.ema = (m * self.ema[0] + (1 - m) * mn, m * self.ema[1] + (1 - m) * mx)
        self._widen(max(abs(mn), abs(mx)))
        if self.radius > 0.0:
            # float64 makes x + R exact, so a value's bin does not depend on the radius it was binned at (with
            # power-of-two bins): shards captured apart and merged give the one-pass histogram (qdiff.calib.sharded)
            pos = (xf.double() + self.radius) * (self.bins / (2.0 * self.radius))
            idx = pos.floor().clamp_(0, self.bins - 1).long()
            self.hist[step] += torch.bincount(idx.cpu(), minlength=self.bins)
        else:  # all zeros so far: they belong to the two middle bins' boundary; count them in the upper one
            self.hist[step, self.bins // 2] += xf.numel()
        self.num_updates += 1

    # ---- derived ranges --------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.step_min)

    def minmax(self) -> tuple[float, float]:
        seen = [i for i, c in enumerate(self.step_count) if c]
        if not seen:
            raise RuntimeError("no data observed")
        return min(self.step_min[i] for i in seen), max(self.step_max[i] for i in seen)

    def pooled_hist(self) -> Tensor:
        """(bins,) int64 counts over all steps."""
        return self.hist.sum(0)

    def bin_centres(self) -> Tensor:
        """(bins,) float64 centres of the histogram bins."""
        width = 2.0 * self.radius / self.bins
        return -self.radius + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def percentile_range(self, p: float) -> tuple[float, float]:
        """The (100 - p)-th and p-th percentiles of the pooled distribution (linear inside a bin)."""
        counts = self.pooled_hist().double()
        total = float(counts.sum())
        if total == 0:
            raise RuntimeError("no data observed")
        cdf = torch.cumsum(counts, 0)
        edges = torch.linspace(-self.radius, self.radius, self.bins + 1, dtype=torch.float64)

        def at(q: float) -> float:
            target = q / 100.0 * total
            i = int(torch.searchsorted(cdf, torch.tensor(target, dtype=torch.float64)).clamp(max=self.bins - 1))
            before = float(cdf[i - 1]) if i > 0 else 0.0
            frac = 0.0 if counts[i] == 0 else (target - before) / float(counts[i])
            return float(edges[i] + frac * (edges[i + 1] - edges[i]))

        lo, hi = self.minmax()
        return max(lo, at(100.0 - p)), min(hi, at(p))

    def mse_range(self, bits: int, symmetric: bool, grid: int = 100, lo: float = 0.3) -> tuple[float, float]:
        """``alpha * (min, max)`` minimising the count-weighted squared error on the bin centres."""
        mn, mx = self.minmax()
        centres, weights = self.bin_centres().float(), self.pooled_hist().double()
        keep = weights > 0
        centres, weights = centres[keep], weights[keep]
        best, best_err = 1.0, math.inf
        for alpha in torch.linspace(1.0, lo, grid).tolist():
            s, z = compute_qparams(torch.tensor(alpha * mn), torch.tensor(alpha * mx), bits, symmetric)
            xq = dequantize(quantize(centres, s, z, bits, symmetric), s, z)
            err = float(((xq - centres).double() ** 2 * weights).sum())
            if err < best_err:
                best, best_err = alpha, err
        return best * mn, best * mx

    def range(self, observer: str, *, bits: int = 8, symmetric: bool = False, percentile: float = 99.99) -> tuple:
        """``(min, max)`` as the named observer would report it (minmax | ema | percentile | mse)."""
        if observer == "minmax":
            return self.minmax()
        if observer == "ema":
            if self.ema is None:
                raise RuntimeError("no data observed")
            return self.ema
        if observer == "percentile":
            return self.percentile_range(percentile)
        if observer == "mse":
            return self.mse_range(bits, symmetric)
        raise ValueError(f"unknown observer {observer!r}")

    def qparams(self, observer: str, bits: int, symmetric: bool = False, percentile: float = 99.99):
        lo, hi = self.range(observer, bits=bits, symmetric=symmetric, percentile=percentile)
        f32 = torch.float32
        return compute_qparams(torch.tensor(lo, dtype=f32), torch.tensor(hi, dtype=f32), bits, symmetric)

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    def to_parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {
            "hist": self.hist.contiguous(),
            "step_min": torch.tensor(self.step_min, dtype=torch.float64),
            "step_max": torch.tensor(self.step_max, dtype=torch.float64),
            "step_count": torch.tensor(self.step_count, dtype=torch.int64),
        }
        meta = {
            "bins": self.bins, "momentum": self.momentum, "radius": self.radius,
            "ema": None if self.ema is None else list(self.ema), "numel_per_sample": self.numel_per_sample,
            "num_updates": self.num_updates,
        }  # fmt: skip
        return tensors, meta

    @classmethod
    def from_parts(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> LayerStats:
        out = cls(int(meta["bins"]), float(meta["momentum"]))
        out.hist = tensors["hist"].to(torch.int64).clone()
        out.step_min = tensors["step_min"].tolist()
        out.step_max = tensors["step_max"].tolist()
        out.step_count = [int(v) for v in tensors["step_count"].tolist()]
        out.radius = float(meta["radius"])
        out.ema = None if meta["ema"] is None else (float(meta["ema"][0]), float(meta["ema"][1]))
        out.numel_per_sample = int(meta["numel_per_sample"])
        out.num_updates = int(meta["num_updates"])
        if out.hist.shape != (out.steps, out.bins):
            raise ValueError(f"histogram shape {tuple(out.hist.shape)} != ({out.steps}, {out.bins})")
        return out


@dataclass
class CapturedStats:
    """Statistics of every captured layer plus how they were obtained (prompts, sampler, BOS layers)."""

    layers: dict[str, LayerStats]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """Write ``ranges.safetensors`` + ``ranges.json`` into ``folder`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, per_layer = {}, {}
        for name, st in self.layers.items():
            parts, meta = st.to_parts()
            tensors.update({f"{name}::{k}": v for k, v in parts.items()})
            per_layer[name] = meta
        tmp = usual_mkstemp(folder, prefix=f".{STATS_TENSORS}.")
        try:
            save_file(tensors, str(tmp), metadata={"qdiff": "ranges"})
            os.replace(tmp, folder / STATS_TENSORS)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        doc = {"format": "qdiff-ranges", "version": STATS_VERSION, "meta": self.meta, "layers": per_layer}
        write_text_atomic(folder / STATS_JSON, json.dumps(doc, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> CapturedStats:
        folder = Path(folder)
        path = folder / STATS_JSON
        try:
            doc = json.loads(path.read_text())
            tensors = load_file(str(folder / STATS_TENSORS))
        except (OSError, json.JSONDecodeError) as exc:
            raise QdiffError(f"{path}: cannot read captured statistics ({exc})") from None
        if doc.get("format") != "qdiff-ranges" or doc.get("version") != STATS_VERSION:
            raise QdiffError(f"{path}: not a version-{STATS_VERSION} qdiff ranges file")
        layers = {}
        for name, meta in doc["layers"].items():
            parts = {k: tensors[f"{name}::{k}"] for k in ("hist", "step_min", "step_max", "step_count")}
            layers[name] = LayerStats.from_parts(parts, meta)
        return cls(layers, doc.get("meta") or {})


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    tmp = usual_mkstemp(path.parent, prefix=f".{path.name}.")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
