"""Activation-range observers used during calibration (stateful plain Python classes, not ``nn.Module``).

Every observer reduces the values it sees to a ``(min_val, max_val)`` float32 range and turns it into quantization
parameters with :func:`qdiff.numerics.primitives.compute_qparams`. Ranges are per-tensor (0-d tensors) unless an
``axis`` is given (``MinMaxObserver``, ``EMAMinMaxObserver``): then that axis is kept and all others reduced, giving
1-D ranges of shape ``(C,)`` with ``C = x.shape[axis]``; reshape them to broadcast against the activation.

``state_dict`` / ``load_state_dict`` hold only the running state (CPU float32 tensors and ints), so calibration can
be checkpointed and resumed; configuration (momentum, axis, percentile, ...) comes from the constructor.

``a.merge(b)`` folds in an observer of the same configuration that saw the updates coming *after* ``a``'s (e.g. the
next prompt shard of a distributed run): min / max exactly; the EMA by its order-defined merge
``e = e_b + m**n_b * (e_a - first_b)`` (``first_b``: ``b``'s first batch range), which is the EMA of ``a``'s updates
followed by ``b``'s; percentile means weighted by update counts; the MSE sample by update-count shares.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from qdiff.numerics.primitives import (
    Granularity,
    compute_qparams,
    dequantize,
    qrange,
    quantize,
    weight_minmax,
)
from qdiff.utils.finite import check_range, check_tensor

__all__ = [
    "OBSERVER_NAMES",
    "Observer",
    "MinMaxObserver",
    "EMAMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "make_observer",
    "mse_weight_scale",
]

OBSERVER_NAMES: tuple[str, ...] = ("minmax", "ema", "percentile", "mse")

_PERCENTILE_MAX_NUMEL = 2**20
_MSE_SAMPLE_SIZE = 65536
_SEARCH_CHUNK_NUMEL = 1 << 22  # bound on the (alphas x values) temporaries of the clip-ratio searches (16 MiB fp32)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _strided_sample(x: Tensor, max_count: int, exact: bool = False) -> Tensor:
    """Deterministic strided subsample of ``x`` flattened, float32 1-D: ``<= max_count`` values.

    The stride is chosen coprime with the last dim so that every column (e.g. every hidden channel of a
    ``(B, T, C)`` activation) is still visited; a stride sharing a factor with ``C`` could skip outlier channels.
    ``exact=True`` takes the largest coprime stride giving at least ``max_count`` values, then thins the result
    evenly to exactly ``max_count``.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    if n <= max_count:
        return flat
    inner = x.shape[-1] if x.dim() > 0 else 1
    if exact:
        stride = max(1, n // max_count)
        while math.gcd(stride, inner) != 1:
            stride -= 1
        return _even_subsample(flat[::stride], max_count)
    stride = math.ceil(n / max_count)
    while math.gcd(stride, inner) != 1:
        stride += 1
    return flat[::stride]


def _even_subsample(v: Tensor, count: int) -> Tensor:
    """``count`` evenly spaced elements of the 1-D tensor ``v`` (all of it if it is not longer)."""
    if v.numel() <= count:
        return v
    if count <= 0:
        return v[:0]
    idx = torch.linspace(0, v.numel() - 1, count, dtype=torch.float64, device=v.device).round().long()
    return v[idx]


def _kth_linear(v: Tensor, q: float) -> Tensor:
    """Percentile ``q`` (0-100) of the 1-D float32 ``v`` with linear interpolation (numpy's default), via kthvalue."""
    n = v.numel()
    pos = q / 100.0 * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(v, lo + 1).values
    if hi == lo or frac == 0.0:
        return v_lo
    v_hi = torch.kthvalue(v, hi + 1).values
    return v_lo + (v_hi - v_lo) * frac


def _to_state(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float32).clone()


def _from_state(v: Any) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32).detach().clone()


# --------------------------------------------------------------------------------------------------------------------
# observers
# --------------------------------------------------------------------------------------------------------------------


class Observer:
    """Base observer: keeps a float32 ``(min_val, max_val)`` range and the number of (non-empty) updates seen."""

    name: str = ""

    def __init__(self) -> None:
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self._num_updates: int = 0

    def update(self, x: Tensor) -> None:
        """Fold a batch of values ``x`` (any shape, any float dtype) into the running range."""
        raise NotImplementedError

    @property
    def initialized(self) -> bool:
        """True once at least one non-empty update has been observed."""
        return self._min is not None

    def range(self) -> tuple[Tensor, Tensor]:
        """``(min_val, max_val)`` float32 (0-d per-tensor, ``(C,)`` per-channel); RuntimeError if never updated."""
        if self._min is None or self._max is None:
            raise RuntimeError(f"{type(self).__name__} has not observed any data yet")
        return self._min, self._max

    def qparams(self, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        """``(scale float32, zero_point int32)`` for the observed range, shaped like :meth:`range`."""
        mn, mx = self.range()
        return compute_qparams(mn, mx, bits, symmetric)

    def state_dict(self) -> dict[str, Any]:
        """Running state: ``num_updates`` (int) and, once initialized, ``min_val`` / ``max_val`` (CPU float32)."""
        state: dict[str, Any] = {"num_updates": self._num_updates}
        if self._min is not None:
            state["min_val"] = _to_state(self._min)
            state["max_val"] = _to_state(self._max)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors, or nested lists / numbers as from JSON)."""
        if "num_updates" not in state:
            raise KeyError(f"{type(self).__name__} state is missing 'num_updates'")
        if ("min_val" in state) != ("max_val" in state):
            raise KeyError(f"{type(self).__name__} state must hold both 'min_val' and 'max_val' or neither")
        self._num_updates = int(state["num_updates"])
        if "min_val" in state:
            self._min = _from_state(state["min_val"])
            self._max = _from_state(state["max_val"])
        else:
            self._min = self._max = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_updates={self._num_updates})"

    def merge(self, later: Observer) -> None:
        """Fold in ``later``, an observer of the same kind and settings that saw the updates after this one's."""
        if type(later) is not type(self):
            raise TypeError(f"cannot merge {type(later).__name__} into {type(self).__name__}")
        if later._min is None:
            return
        if self._min is None:
            self.load_state_dict(later.state_dict())
            return
        self._merge_state(later)
        self._num_updates += later._num_updates

    def _merge_state(self, later: Observer) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")


class _AxisObserver(Observer):
    """Observer whose batch statistics are per-tensor (``axis=None``) or per-channel along ``axis``."""

    def __init__(self, axis: int | None = None) -> None:
        super().__init__()
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        self.axis = axis
        self._first: tuple[Tensor, Tensor] | None = None  # range of the first batch (for merges)

    def _batch_minmax(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Batch ``(min, max)`` float32: 0-d per-tensor or ``(C,)`` along ``axis``."""
        xf = x.detach().float()
        if self.axis is None:
            return torch.aminmax(xf)
        if xf.dim() == 0:
            raise ValueError(f"axis={self.axis} needs a tensor with at least one dimension")
        xf = xf.movedim(self.axis, 0).reshape(xf.shape[self.axis], -1)
        mn, mx = torch.aminmax(xf, dim=1)
        if self._min is not None and self._min.shape != mn.shape:
            raise ValueError(
                f"channel count changed along axis {self.axis}: {tuple(self._min.shape)} vs {tuple(mn.shape)}"
            )
        return mn, mx

    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        mn, mx = self._batch_minmax(x)
        check_range(x, mn, mx)  # NaN / Inf would become a NaN scale
        if self._min is None or self._max is None:
            self._min, self._max = mn, mx
            self._first = (mn, mx)  # the EMA's order-defined merge needs the first batch range
        else:
            self._min, self._max = self._merge(self._min.to(mn.device), self._max.to(mx.device), mn, mx)
        self._num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if getattr(self, "_first", None) is not None:
            state["first_min"], state["first_max"] = (_to_state(t) for t in self._first)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        has = "first_min" in state
        self._first = (_from_state(state["first_min"]), _from_state(state["first_max"])) if has else None

    def _merge(self, old_min: Tensor, old_max: Tensor, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
        """The running range after a batch with range ``(mn, mx)`` (the first batch sets it directly)."""
        raise NotImplementedError


class MinMaxObserver(_AxisObserver):
    """Running global min / max (per-tensor or per-channel along ``axis``)."""

    name = "minmax"

    def _merge(self, old_min: Tensor, old_max: Tensor, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
        return torch.minimum(old_min, mn), torch.maximum(old_max, mx)

    def _merge_state(self, later: Observer) -> None:
        self._min, self._max = self._merge(self._min, self._max, *later.range())


class EMAMinMaxObserver(_AxisObserver):
    """Exponential moving average of batch min / max (MixDQ): ``m = momentum * m + (1 - momentum) * batch``.

    The first update sets the range directly.
    """

    name = "ema"

    def __init__(self, momentum: float = 0.95, axis: int | None = None) -> None:
        super().__init__(axis)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def _merge(self, old_min: Tensor, old_max: Tensor, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
        m = self.momentum
        return m * old_min + (1.0 - m) * mn, m * old_max + (1.0 - m) * mx

    def _merge_state(self, later: Observer) -> None:
        # sequential EMA over a's updates then b's: e_b + m**n_b * (e_a - first_b), computed in float64
        if later.momentum != self.momentum:  # type: ignore[attr-defined]
            raise ValueError(f"momentum differs: {self.momentum} vs {later.momentum}")  # type: ignore[attr-defined]
        if getattr(later, "_first", None) is None:
            raise ValueError("the later EMA observer has no first-batch range (state saved before merges existed)")
        decay = self.momentum**later._num_updates
        ends = zip((self._min, self._max), later.range(), later._first)  # type: ignore[attr-defined]
        self._min, self._max = ((b.double() + decay * (a.double() - f.double())).float() for a, b, f in ends)

    def __repr__(self) -> str:
        return f"EMAMinMaxObserver(momentum={self.momentum}, axis={self.axis}, num_updates={self._num_updates})"


class PercentileObserver(Observer):
    """Per update, the ``100 - p`` / ``p`` percentiles of the float32 values; the range is their mean over updates.

    Percentiles are exact order statistics with linear interpolation (numpy's default), computed with
    ``torch.kthvalue``; above ``2**20`` values a deterministic strided subsample is used.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        if not 50.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {percentile}")
        self.percentile = float(percentile)

    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        check_tensor(x)  # before subsampling, which could step over a NaN
        v = _strided_sample(x, _PERCENTILE_MAX_NUMEL)
        lo = _kth_linear(v, 100.0 - self.percentile)
        hi = _kth_linear(v, self.percentile)
        n = self._num_updates + 1
        if self._min is None or self._max is None:
            self._min, self._max = lo, hi
        else:  # running mean over updates
            self._min = self._min.to(lo.device) + (lo - self._min.to(lo.device)) / n
            self._max = self._max.to(hi.device) + (hi - self._max.to(hi.device)) / n
        self._num_updates = n

    def _merge_state(self, later: Observer) -> None:
        w = later._num_updates / (self._num_updates + later._num_updates)  # mean over all updates
        lo, hi = later.range()
        self._min = (self._min.double() + (lo.double() - self._min.double()) * w).float()
        self._max = (self._max.double() + (hi.double() - self._max.double()) * w).float()

    def __repr__(self) -> str:
        return f"PercentileObserver(percentile={self.percentile}, num_updates={self._num_updates})"


class MSEObserver(Observer):
    """Min / max plus a bounded deterministic sample; ``qparams`` searches the clip ratio minimising the MSE.

    The sample holds at most ``sample_size`` values, every update getting an (about) equal share: a strided
    subsample of each new batch, and an evenly spaced thinning of the old sample (no randomness).
    ``qparams(bits, symmetric)`` evaluates ``alpha * (min, max)`` for ``grid`` ratios evenly spaced in ``[lo, 1]``
    and returns the qparams whose fake-quant error on the sample is smallest; ``alpha = 1`` (min-max) is on the
    grid and wins ties, so the result is never worse than min-max on the sample.
    """

    name = "mse"

    def __init__(self, grid: int = 100, lo: float = 0.3, sample_size: int = _MSE_SAMPLE_SIZE) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if not 0.0 < lo <= 1.0:
            raise ValueError(f"lo must be in (0, 1], got {lo}")
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        self.grid = int(grid)
        self.lo = float(lo)
        self.sample_size = int(sample_size)
        self._sample: Tensor | None = None

    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        xf = x.detach()
        mn, mx = torch.aminmax(xf.float())
        check_range(xf, mn, mx)
        n = self._num_updates + 1
        new = _strided_sample(xf, max(1, self.sample_size // n), exact=True)
        if self._min is None or self._max is None or self._sample is None:
            self._min, self._max, self._sample = mn, mx, new
        else:
            self._min = torch.minimum(self._min.to(mn.device), mn)
            self._max = torch.maximum(self._max.to(mx.device), mx)
            # the old sample represents n - 1 updates: keep (n - 1) shares of the new one's size, within the bound
            keep = min(self.sample_size - new.numel(), new.numel() * (n - 1))
            old = _even_subsample(self._sample.to(new.device), keep)
            self._sample = torch.cat([old, new])
        self._num_updates = n

    def _merge_state(self, later: Observer) -> None:
        n_a, n_b = self._num_updates, later._num_updates
        self._min, self._max = torch.minimum(self._min, later._min), torch.maximum(self._max, later._max)
        keep = min(self._sample.numel(), round(self.sample_size * n_a / (n_a + n_b)))  # update-count shares
        old = _even_subsample(self._sample, keep)
        new = _even_subsample(later.sample, self.sample_size - old.numel())  # type: ignore[attr-defined]
        self._sample = torch.cat([old, new])

    @property
    def sample(self) -> Tensor:
        """The retained float32 1-D sample (RuntimeError if never updated)."""
        if self._sample is None:
            raise RuntimeError("MSEObserver has not observed any data yet")
        return self._sample

    def qparams(self, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        mn, mx = self.range()
        sample = self.sample
        alphas = _alpha_grid(self.grid, self.lo, mn.device)  # (A,), alphas[0] == 1
        scale, zp = compute_qparams(alphas * mn, alphas * mx, bits, symmetric)  # (A,), (A,)
        errs = []
        chunk = max(1, _SEARCH_CHUNK_NUMEL // max(1, sample.numel()))
        for i in range(0, alphas.numel(), chunk):
            s, z = scale[i : i + chunk, None], zp[i : i + chunk, None]
            xq = dequantize(quantize(sample[None, :], s, z, bits, symmetric), s, z)
            errs.append((xq - sample[None, :]).square().mean(dim=1))
        best = int(torch.argmin(torch.cat(errs)))  # first minimum: the largest alpha among ties
        return scale[best], zp[best]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._sample is not None:
            state["sample"] = _to_state(self._sample)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._min is not None and "sample" not in state:
            raise KeyError("MSEObserver state is missing 'sample'")
        self._sample = _from_state(state["sample"]).reshape(-1) if self._min is not None else None

    def __repr__(self) -> str:
        return f"MSEObserver(grid={self.grid}, lo={self.lo}, num_updates={self._num_updates})"


def make_observer(name: str, **kwargs: Any) -> Observer:
    """Build an observer by name: ``"minmax"``, ``"ema"``, ``"percentile"`` or ``"mse"``; kwargs go to the class."""
    classes: dict[str, type[Observer]] = {
        "minmax": MinMaxObserver,
        "ema": EMAMinMaxObserver,
        "percentile": PercentileObserver,
        "mse": MSEObserver,
    }
    if name not in classes:
        raise ValueError(f"unknown observer {name!r}; expected one of: {', '.join(OBSERVER_NAMES)}")
    return classes[name](**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# MSE-searched weight scales
# --------------------------------------------------------------------------------------------------------------------


def _alpha_grid(grid: int, lo: float, device: torch.device | str | None = None) -> Tensor:
    """Clip ratios, descending from exactly 1.0 to ``lo`` (``grid`` values), float32 ``(grid,)``."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if not 0.0 < lo <= 1.0:
        raise ValueError(f"lo must be in (0, 1], got {lo}")
    alphas = torch.linspace(1.0, lo, grid, dtype=torch.float64)
    alphas[0] = 1.0
    return alphas.to(device=device, dtype=torch.float32)


def mse_weight_scale(
    w2d: Tensor,
    bits: int,
    granularity: Granularity,
    group_size: int | None = None,
    grid: int = 100,
    lo: float = 0.3,
) -> Tensor:
    """Symmetric weight scale with a clip-ratio search minimising the squared quantization error.

    ``w2d`` (N, K). For each tensor / row / group independently (vectorised), tries ``alpha * minmax`` for ``grid``
    ratios in ``[lo, 1]`` and keeps the one with the smallest sum of squared errors. Returns float32 with the shape
    :func:`~qdiff.numerics.primitives.weight_minmax` gives: (1, 1), (N, 1) or (N, G). ``alpha = 1`` is on the grid and
    wins ties, so the result is never worse than min-max for any row / group.
    """
    mn, mx = weight_minmax(w2d, granularity, group_size)  # validates shapes / granularity
    qrange(bits, True)  # validates bits
    w = w2d.detach().float()
    N, K = w.shape
    if granularity == "tensor":
        blocks = w.reshape(1, 1, N * K)
    elif granularity == "channel":
        blocks = w.reshape(N, 1, K)
    else:
        gs = int(group_size)  # type: ignore[arg-type]
        G = mn.shape[1]
        pad = G * gs - K
        # zero padding quantizes to exactly 0, adding no error to the ragged last group
        blocks = torch.nn.functional.pad(w, (0, pad)).reshape(N, G, gs)
    alphas = _alpha_grid(grid, lo, w.device)  # descending from 1.0
    chunk = max(1, _SEARCH_CHUNK_NUMEL // blocks.numel())  # alphas evaluated together: few, large ops
    best_scale: Tensor | None = None
    best_err: Tensor | None = None
    for i in range(0, alphas.numel(), chunk):
        a = alphas[i : i + chunk].reshape(-1, 1, 1)
        scale, _ = compute_qparams(a * mn, a * mx, bits, symmetric=True)  # (c, *mn.shape)
        s = scale.unsqueeze(-1)
        err = (dequantize(quantize(blocks, s, None, bits, True), s, None) - blocks).square().sum(dim=-1)
        idx = torch.argmin(err, dim=0, keepdim=True)  # first minimum: the largest alpha among ties
        c_err, c_scale = err.gather(0, idx)[0], scale.gather(0, idx)[0]
        if best_scale is None or best_err is None:
            best_scale, best_err = c_scale, c_err
        else:  # strict: an earlier (larger) alpha wins ties
            better = c_err < best_err
            best_scale = torch.where(better, c_scale, best_scale)
            best_err = torch.where(better, c_err, best_err)
    assert best_scale is not None  # the grid is never empty
    return best_scale
