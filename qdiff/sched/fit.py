"""Fit Q-Sched coefficients: search theta to maximise JAQ on fitting prompts, validate on held-out ones.

The search sees only ``evaluate(schedule, split) -> (alignment (P,), quality (P,))``: images drawn by
the *quantized* pipeline with that schedule, scored by reference-free scorers. Every evaluation is
cached under its rounded coefficients and appended to a JSONL log; a restarted fit replays the log, and
because the optimisers are deterministic it asks for the same points again and gets them from the
cache, so an interrupted fit resumes where it stopped and ends with the same result.

After the search, identity and the best coefficients are scored on held-out prompts with other seeds;
a fitted schedule is kept only if the held-out JAQ improves by more than ``min_gain`` (Q-Sched's
metric-hacking risk: the scorer can be optimised without the images improving).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from qdiff.config.recipe import QSchedConfig
from qdiff.distributed.env import current
from qdiff.distributed.shard import all_gather_in_order, assign
from qdiff.errors import QdiffError
from qdiff.sched import params, search
from qdiff.sched.jaq import jaq
from qdiff.sched.qsched import Schedule
from qdiff.utils.progress import progress_bar

ROUND = 5  # decimals of the coefficients that key the cache (images are drawn with the rounded values)
LOG_VERSION = 1
Evaluate = Callable[[Schedule, str], tuple[Tensor, ...]]  # (schedule, split) -> (alignment, quality[, features])
Penalty = Callable[[str], float]  # cache key of a fitting-split evaluation -> value subtracted from its JAQ


@dataclass(frozen=True)
class FitResult:
    """Outcome of a fit. ``schedule`` is what to use: the fitted coefficients, or identity when refused."""

    schedule: Schedule
    accepted: bool
    message: str
    parameterisation: str
    optimiser: str
    theta: tuple[float, ...]  # best theta on the fitting prompts
    train_jaq_identity: float
    train_jaq_best: float
    heldout_jaq_identity: float
    heldout_jaq_best: float
    evaluations: int  # objective calls on the fitting prompts (identity included)
    generations: int  # images behind this result (fitting + held-out), log-replayed ones included
    new_generations: int  # images actually drawn in this call (0 when everything came from the log)
    curve: tuple[tuple[int, float], ...]  # (generations so far, best fitting JAQ so far)
    report: dict[str, Any] = field(default_factory=dict)  # guards and validation metrics (qdiff.sched.guard)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schedule"] = self.schedule.to_dict()
        out["curve"] = [list(p) for p in self.curve]
        return out


def coefficient_key(split: str, sched: Schedule) -> str:
    vals = ",".join(f"{v:.{ROUND}f}" for v in sched.c_eps + sched.c_x)
    return f"{split}|{sched.steps}|{vals}"


def rounded_schedule(name: str, theta, steps: int) -> Schedule:
    c_eps, c_x = params.coefficients(name, theta, steps)
    return Schedule(tuple(round(v, ROUND) for v in c_eps), tuple(round(v, ROUND) for v in c_x))


class EvalCache:
    """Scores per (split, rounded coefficients), mirrored to an append-only JSONL log when ``path`` is set.

    The log's first line holds a fingerprint of everything the scores depend on (model, prompts,
    seeds, sampler, scorers); a log written for another setup is refused, not silently reused.
    """

    def __init__(self, path: str | Path | None, fingerprint: Mapping[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.fingerprint = json.loads(json.dumps(dict(fingerprint)))  # normalised (tuples -> lists)
        self.entries: dict[str, tuple[list[float], list[float]]] = {}
        self.feature_rows: dict[str, list[list[float]]] = {}  # key -> (P, D) image features, when recorded
        group = current()  # under torchrun rank 0 alone reads and appends the log; the others get its entries
        if group.distributed and not group.is_main:
            self.path = None
        with group.phase("Q-Sched evaluation log"):
            if self.path is not None and self.path.is_file() and self.path.stat().st_size > 0:
                self._replay()
            elif self.path is not None:
                self._append({"type": "header", "version": LOG_VERSION, "fingerprint": self.fingerprint})
        if group.distributed:
            self.entries, self.feature_rows = group.broadcast((self.entries, self.feature_rows))

    def _replay(self) -> None:
        text = self.path.read_text()
        if not text.endswith("\n"):  # a record cut short by an interruption: drop it before appending again
            text = text[: text.rfind("\n") + 1]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
        lines = text.splitlines()
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            raise QdiffError(f"{self.path}: not a Q-Sched evaluation log (bad header line)") from None
        if header.get("type") != "header" or header.get("version") != LOG_VERSION:
            raise QdiffError(f"{self.path}: not a Q-Sched evaluation log (version {LOG_VERSION})")
        theirs = header.get("fingerprint", {})
        if theirs != self.fingerprint:
            diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise QdiffError(f"{self.path}: log was written for a different fit setup ({', '.join(diff)} differ); "
                             "use a new log path")  # fmt: skip
        for i, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise QdiffError(f"{self.path}: line {i} is not valid JSON") from None
            self.entries[rec["key"]] = (rec["alignment"], rec["quality"])
            if rec.get("features") is not None:
                self.feature_rows[rec["key"]] = rec["features"]

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def get(self, key: str) -> tuple[list[float], list[float]] | None:
        return self.entries.get(key)

    def prefetch(self, items: list[tuple[str, Schedule, str]], evaluate: Evaluate) -> None:
        """Under torchrun: evaluate the uncached ``(key, schedule, split)`` items spread over the ranks and record
        all of them on every rank (rank 0 logs them), so the search's next calls are cache hits. One process: no-op.
        """
        group = current()
        todo = list({k: (k, s, sp) for k, s, sp in items if k not in self.entries}.values())
        if not group.distributed or len(todo) < 2:
            return
        mine: dict[str, tuple] = {}
        with group.phase("Q-Sched candidates"):
            for j in assign([1.0] * len(todo), group.world_size)[group.rank]:
                key, sched, split = todo[j]
                a, q, *f = evaluate(sched, split)
                rows = f[0].double().tolist() if f and f[0] is not None else None
                mine[key] = ([float(v) for v in a], [float(v) for v in q], rows)
        for (key, sched, _), (a, q, rows) in zip(todo, all_gather_in_order(group, mine, [t[0] for t in todo])):
            self.put(key, sched, a, q, rows)

    def features(self, key: str) -> list[list[float]] | None:
        """(P, D) image features recorded with ``key``'s scores, or None."""
        return self.feature_rows.get(key)

    def put(self, key: str, sched: Schedule, alignment: list[float], quality: list[float],
            features: list[list[float]] | None = None) -> None:  # fmt: skip
        self.entries[key] = (alignment, quality)
        if features is not None:
            self.feature_rows[key] = features
        if self.path is not None:
            rec = {"type": "eval", "key": key, "c_eps": list(sched.c_eps), "c_x": list(sched.c_x),
                   "alignment": alignment, "quality": quality}  # fmt: skip
            self._append(rec if features is None else {**rec, "features": features})


def default_budget(cfg: QSchedConfig, num_prompts: int) -> int:
    """Generations: the whole grid for ``grid``, else 20% of the grid's (the issue's target)."""
    grid = cfg.grid_size**2 * num_prompts
    if cfg.budget is not None:
        return cfg.budget
    return grid if cfg.optimiser == "grid" else max(num_prompts, int(0.2 * grid))


def fit(
    evaluate: Evaluate,
    cfg: QSchedConfig,
    steps: int,
    num_fit: int,
    num_heldout: int,
    cache: EvalCache | None = None,
    progress: bool = True,
    penalty: Penalty | None = None,
    subset: Sequence[int] | None = None,
    ridge: float = 0.0,
) -> FitResult:
    """Search ``cfg.parameterisation`` with ``cfg.optimiser``; validate on the held-out split.

    ``penalty(key)``, when given, is subtracted from the JAQ of every fitting-split evaluation (the search
    maximises ``JAQ - penalty``; the reported fitting JAQ includes it, the held-out JAQ does not).
    ``subset``: the fitting prompts whose scores enter the objective (all are drawn, so evaluations are shared
    with fits on other subsets); ``ridge``: shrinkage toward identity, ``ridge * mean((c - 1)^2)`` over every
    coefficient is subtracted from the fitting JAQ (:func:`ridge_penalty`).
    """
    cache = cache or EvalCache(None, {})
    name, lo, hi = cfg.parameterisation, cfg.range_min, cfg.range_max
    budget = default_budget(cfg, num_fit)
    if cfg.optimiser == "grid" and budget < cfg.grid_size**2 * num_fit:
        raise QdiffError(f"recipe: qsched.budget: the {cfg.grid_size}x{cfg.grid_size} grid needs "
                         f"{cfg.grid_size**2 * num_fit} generations, got {budget}")  # fmt: skip
    state = {"gens": 0, "new": 0, "evals": 0, "best": -math.inf, "theta": None}
    seen: set[str] = set()
    curve: list[tuple[int, float]] = []
    bar = progress_bar(total=budget + (0 if cfg.optimiser != "grid" else num_fit), desc="Q-Sched fit", unit="img",
                       enabled=progress)  # fmt: skip

    def scores(sched: Schedule, split: str, n: int) -> float:
        key = coefficient_key(split, sched)
        hit = cache.get(key)
        if hit is None:
            a, q, *feats = evaluate(sched, split)
            hit = ([float(v) for v in a], [float(v) for v in q])
            cache.put(key, sched, *hit, feats[0].double().tolist() if feats and feats[0] is not None else None)
            state["new"] += n
        if key not in seen:
            seen.add(key)
            state["gens"] += n
            bar.update(n if split == "fit" else 0)
        a, q = hit
        if split == "fit" and subset is not None:
            a, q = [a[i] for i in subset], [q[i] for i in subset]
        value = float(jaq(_t(a), _t(q), cfg.k, cfg.log_alignment, cfg.alignment_weight))
        if split == "fit" and ridge:
            value -= ridge * ridge_penalty(sched)
        return value - penalty(key) if penalty is not None and split == "fit" else value

    def objective(theta) -> float:
        value = scores(rounded_schedule(name, theta, steps), "fit", num_fit)
        state["evals"] += 1
        if value > state["best"]:
            state["best"], state["theta"] = value, tuple(float(v) for v in theta)
        curve.append((state["gens"], state["best"]))
        return value

    objective.prefetch = lambda thetas, split="fit": _prefetch(  # type: ignore[attr-defined]
        cache, evaluate, [rounded_schedule(name, t, steps) for t in thetas], split
    )
    identity = params.identity_theta(name, steps)
    dim = len(identity)
    try:
        train_id = objective(identity)
        evals = max(1, budget // num_fit)
        if cfg.optimiser == "grid":
            search.grid_search(objective, lo, hi, cfg.grid_size, dim)
        elif cfg.optimiser == "cmaes":
            search.cmaes(objective, identity, (hi - lo) / 4, evals - 1, lo, hi, seed=cfg.seed)
        else:
            search.coordinate_search(objective, identity, (hi - lo) / 4, evals, lo, hi)
    finally:
        bar.close()
    theta, train_best = state["theta"], state["best"]
    best_sched = rounded_schedule(name, theta, steps)
    objective.prefetch([identity, theta], "heldout")  # type: ignore[attr-defined]
    held_id = scores(rounded_schedule(name, identity, steps), "heldout", num_heldout)
    held_best = scores(best_sched, "heldout", num_heldout)
    gain = held_best - held_id
    accepted = not best_sched.is_identity and gain > cfg.min_gain
    where = f"{name}/{cfg.optimiser}, {state['gens']} generations"
    if accepted:
        message = f"Q-Sched: held-out JAQ {held_id:.4f} -> {held_best:.4f} (+{gain:.4f}) ({where})"
        meta = {"parameterisation": name, "theta": list(theta), "optimiser": cfg.optimiser,
                "jaq": {"fit_identity": train_id, "fit": train_best,
                        "heldout_identity": held_id, "heldout": held_best},
                "k": cfg.k, "generations": state["gens"]}  # fmt: skip
        schedule = Schedule(best_sched.c_eps, best_sched.c_x, meta)
    else:
        why = (
            "the search found nothing better than identity"
            if best_sched.is_identity
            else (f"held-out JAQ {held_id:.4f} -> {held_best:.4f} (gain {gain:+.4f} <= min_gain {cfg.min_gain})")
        )
        message = f"Q-Sched: no held-out gain ({why}); keeping identity coefficients ({where})"
        schedule = Schedule.identity(steps)
    return FitResult(
        schedule=schedule, accepted=accepted, message=message, parameterisation=name, optimiser=cfg.optimiser,
        theta=theta, train_jaq_identity=train_id, train_jaq_best=train_best, heldout_jaq_identity=held_id,
        heldout_jaq_best=held_best, evaluations=state["evals"], generations=state["gens"],
        new_generations=state["new"], curve=tuple(curve),
    )  # fmt: skip


def ridge_penalty(sched: Schedule) -> float:
    """``mean((c - 1)^2)`` over all coefficients (c_eps and c_x): the shrinkage term's distance from identity."""
    values = sched.c_eps + sched.c_x
    return sum((v - 1.0) ** 2 for v in values) / len(values)


def _t(values: list[float]) -> Tensor:
    import torch

    return torch.tensor(values, dtype=torch.float64)


def _prefetch(cache, evaluate: Evaluate, scheds: list[Schedule], split: str) -> None:
    """Hand a search step's candidates to the :class:`EvalCache` (also through a key-recording proxy such as
    ``qdiff.sched.guard``'s, whose ``cache`` attribute is the real one) to be evaluated across torchrun ranks."""
    base = cache if isinstance(cache, EvalCache) else getattr(cache, "cache", None)
    if isinstance(base, EvalCache):
        base.prefetch([(coefficient_key(split, s), s, split) for s in scheds], evaluate)
