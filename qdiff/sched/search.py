"""Derivative-free maximisers over a box, each spending at most ``budget`` calls of ``f``.

* :func:`grid_search` — Q-Sched's reference: every point of an n^d grid over [lo, hi]^d (10x10 for the
  2-value ramp). Exhaustive; its cost grows as n^d.
* :func:`cmaes` — CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv 1604.00772), the
  standard (mu/mu_w, lambda) update with rank-one and rank-mu covariance adaptation and cumulative
  step-size control; samples are clipped to the box and the clipped step is what the update sees.
* :func:`coordinate_search` — compass search (Kolda, Lewis & Torczon 2003): try +-step along each
  axis from the incumbent, move on the first improvement, halve the step after a sweep with none.

All are deterministic for a given seed, so a run replayed through a cache asks for the same points in
the same order (this is what makes :mod:`qdiff.sched.fit` resumable). ``f`` is maximised.

An objective may carry ``f.prefetch(points)``: each search hands it the points of one step before asking for
them one by one (the grid, a CMA-ES population, the compass candidates around the incumbent), so that a
distributed run (:meth:`qdiff.sched.fit.EvalCache.prefetch`) evaluates them in parallel; the search itself, and
so its result, is unchanged (the compass prefetch is speculative: points after an improvement may go unused).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

Objective = Callable[[Sequence[float]], float]


def grid_points(lo: float, hi: float, n: int, dim: int) -> list[tuple[float, ...]]:
    """The n^dim grid over [lo, hi]^dim (``linspace(lo, hi, n)`` per axis), first axis slowest."""
    axis = np.linspace(lo, hi, n).tolist() if n > 1 else [0.5 * (lo + hi)]
    return [tuple(p) for p in itertools.product(axis, repeat=dim)]


def _prefetch(f: Objective, points: Sequence[Sequence[float]]) -> None:
    hook = getattr(f, "prefetch", None)
    if hook is not None and points:
        hook([tuple(float(v) for v in p) for p in points])


def grid_search(f: Objective, lo: float, hi: float, n: int, dim: int) -> tuple[tuple[float, ...], float]:
    best, best_val = None, -np.inf
    _prefetch(f, grid_points(lo, hi, n, dim))
    for p in grid_points(lo, hi, n, dim):
        v = f(p)
        if v > best_val:
            best, best_val = p, v
    return best, best_val


def cmaes(
    f: Objective,
    x0: Sequence[float],
    sigma0: float,
    budget: int,
    lo: float,
    hi: float,
    seed: int = 0,
    popsize: int | None = None,
) -> tuple[tuple[float, ...], float]:
    """Maximise ``f`` from mean ``x0`` with initial step ``sigma0``; at most ``budget`` calls."""
    rng = np.random.default_rng(seed)
    m = np.asarray(x0, dtype=np.float64).copy()
    n = m.size
    lam = int(popsize or 4 + int(3 * np.log(n)))
    mu = lam // 2
    w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    mueff = 1.0 / np.sum(w**2)
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    cs = (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0.0, np.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi_n = np.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    sigma = float(sigma0)
    cov, basis, diag = np.eye(n), np.eye(n), np.ones(n)
    pc, ps = np.zeros(n), np.zeros(n)
    best, best_val, used, gen = tuple(m.clip(lo, hi)), -np.inf, 0, 0
    while used < budget:
        z = rng.standard_normal((lam, n))
        x = np.clip(m + sigma * (z * diag) @ basis.T, lo, hi)  # (lam, n)
        k = min(lam, budget - used)
        _prefetch(f, [tuple(x[i]) for i in range(k)])
        vals = np.array([f(tuple(x[i])) for i in range(k)])
        used += k
        i_best = int(np.argmax(vals))
        if vals[i_best] > best_val:
            best, best_val = tuple(float(v) for v in x[i_best]), float(vals[i_best])
        if k < lam:
            break
        y = (x - m) / sigma  # the steps actually taken (after clipping)
        order = np.argsort(-vals, kind="stable")[:mu]
        yw = w @ y[order]  # (n,)
        m = m + sigma * yw
        inv_sqrt = basis @ np.diag(1 / diag) @ basis.T
        ps = (1 - cs) * ps + np.sqrt(cs * (2 - cs) * mueff) * (inv_sqrt @ yw)
        gen += 1
        hsig = np.linalg.norm(ps) / np.sqrt(1 - (1 - cs) ** (2 * gen)) / chi_n < 1.4 + 2 / (n + 1)
        pc = (1 - cc) * pc + hsig * np.sqrt(cc * (2 - cc) * mueff) * yw
        rank_mu = (y[order].T * w) @ y[order]
        cov = (1 - c1 - cmu) * cov + c1 * (np.outer(pc, pc) + (1 - hsig) * cc * (2 - cc) * cov) + cmu * rank_mu
        sigma *= float(np.exp((cs / damps) * (np.linalg.norm(ps) / chi_n - 1)))
        cov = (cov + cov.T) / 2
        evals, basis = np.linalg.eigh(cov)
        diag = np.sqrt(np.maximum(evals, 1e-20))
    return best, best_val


def coordinate_search(
    f: Objective,
    x0: Sequence[float],
    step0: float,
    budget: int,
    lo: float,
    hi: float,
    min_step: float = 1e-3,
) -> tuple[tuple[float, ...], float]:
    """Compass search from ``x0`` with initial step ``step0``; at most ``budget`` calls."""
    x = tuple(float(v) for v in np.clip(np.asarray(x0, dtype=np.float64), lo, hi))
    fx, used, step = f(x), 1, float(step0)
    while used < budget and step >= min_step:
        improved, ahead = False, None
        for i in range(len(x)):
            if ahead != x:  # the candidates around the incumbent on the axes still to try
                ahead = x
                _prefetch(f, _compass(x, step, range(i, len(x)), lo, hi)[: budget - used])
            for sign in (1.0, -1.0):
                cand = list(x)
                cand[i] = float(np.clip(x[i] + sign * step, lo, hi))
                if cand[i] == x[i] or used >= budget:
                    continue
                fc = f(tuple(cand))
                used += 1
                if fc > fx:
                    x, fx, improved = tuple(cand), fc, True
                    break
        if not improved:
            step /= 2
    return x, fx


def _compass(x: tuple[float, ...], step: float, axes, lo: float, hi: float) -> list[tuple[float, ...]]:
    """``x +- step`` along each of ``axes`` (clipped to the box; points equal to ``x`` left out), in search order."""
    out = []
    for i in axes:
        for sign in (1.0, -1.0):
            cand = list(x)
            cand[i] = float(np.clip(x[i] + sign * step, lo, hi))
            if cand[i] != x[i]:
                out.append(tuple(cand))
    return out
