"""Reference-free guards for Q-Sched: a distribution anchor, a trust region and a validation guard.

The JAQ scorers can be pleased by pushing samples off the data manifold (issue 15). No full-precision model
is available to say so, but the quantized model's own *un-scheduled* images are: they are the anchor.

* **Anchor term** (``anchor_weight`` w): the search maximises ``JAQ - w * D(candidate)``, where
  ``D = FD(f(candidate images), f(un-scheduled images)) / tr(cov f(un-scheduled images))`` — the Fréchet
  distance between Gaussians fitted to image features (``qdiff.sched.features``) of the candidate's and the
  identity schedule's images on the fitting prompts (same prompts, same seeds), as a fraction of the anchor's
  total variance. Identity scores exactly 0.
* **Trust region** (``trust_radius``): every coefficient kept in ``[1 - r, 1 + r]`` (within the search box).
  With several radii each is searched and the one with the best validation score is kept (validation = the
  calibration prompts after the fitting ones, other seeds; never an evaluation set).
* **Validation guard** (``guard``): on the validation prompts, the schedule's images and the un-scheduled
  images (same seeds) are both compared with a *second* un-scheduled draw (other seeds, the "reference" split):
  ``drift = FD(schedule, reference) / FD(un-scheduled, reference)``. Above ``1 + guard_tolerance`` the schedule
  moves the picture distribution further from the model's own than re-drawing the seeds does: it is rejected
  and the plain scheduler kept, with a message that says so.

:func:`fit_guarded` runs :func:`qdiff.sched.fit.fit` per radius with the anchor as its penalty, validates, and
decides. With no guard configured it returns what ``fit`` decides, plus the validation metrics in ``report``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qdiff.config.recipe import QSchedConfig
from qdiff.errors import QdiffError
from qdiff.sched import params
from qdiff.sched.fit import EvalCache, Evaluate, FitResult, coefficient_key, fit, rounded_schedule
from qdiff.sched.jaq import alignment_term, jaq, quality_term
from qdiff.sched.qsched import Schedule

REFERENCE_SPLIT = "reference"  # validation prompts, other seeds, identity schedule: the guard's second draw
ANCHOR_SPLIT = "anchor"  # fitting prompts and seeds, un-scheduled at qsched.reference_steps: the anchor's images


# ---- statistics ---------------------------------------------------------------------------------------------
def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D), float64.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``; the square roots by symmetric
    eigen-decomposition (exact for the rank-deficient covariances of few samples).
    """
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise QdiffError(f"Fréchet distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root_a @ s_b @ root_a
    tr_cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_cross)


def anchor_distance(features: Tensor, anchor: Tensor) -> float:
    """``FD(features, anchor) / tr(cov(anchor))``: distribution shift as a fraction of the anchor's variance."""
    anchor = _features(anchor, "anchor")
    total = float(torch.cov(anchor.T).trace()) if anchor.shape[0] > 1 else 0.0
    if total <= 0:
        raise QdiffError("anchor: the un-scheduled images' features have no variance (need >= 2 distinct images)")
    return frechet_distance(features, anchor) / total


def drift_ratio(schedule: Tensor, identity: Tensor, reference: Tensor) -> float:
    """``FD(schedule, reference) / FD(identity, reference)``: > 1 = further from the model's own distribution
    than the un-scheduled images (same seeds as ``schedule``) are; ``reference`` = un-scheduled, other seeds."""
    floor = frechet_distance(identity, reference)
    if floor <= 0:
        raise QdiffError("validation guard: the two un-scheduled draws have identical statistics (same seeds?)")
    return frechet_distance(schedule, reference) / floor


def _features(x: Any, what: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.ndim != 2 or t.shape[0] < 2:
        raise QdiffError(f"Fréchet distance: {what} must be (N >= 2, D) features, got {tuple(t.shape)}")
    return t


# ---- decision -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One searched schedule and its validation numbers (gain in held-out JAQ; anchor and drift may be nan)."""

    radius: float | None
    theta: tuple[float, ...]
    is_identity: bool
    gain: float
    anchor: float = math.nan  # anchor_distance on the validation split (paired with the identity images)
    drift: float = math.nan  # drift_ratio on the validation split

    def score(self, anchor_weight: float) -> float:
        """Validation score: held-out JAQ gain minus the anchor term (the fit's loss, on validation)."""
        return self.gain - (anchor_weight * self.anchor if anchor_weight and not math.isnan(self.anchor) else 0.0)


def choose(cands: Sequence[Candidate], cfg: QSchedConfig) -> tuple[int | None, str]:
    """Index of the candidate to keep (None: keep the plain scheduler) and why.

    Kept: the best validation score among candidates that are not identity, beat ``min_gain`` and, with the
    guard on, do not drift (``drift <= 1 + guard_tolerance``).
    """
    best, best_score, why = None, -math.inf, "the search found nothing better than identity"
    for i, c in enumerate(cands):
        if c.is_identity:
            continue
        s = c.score(cfg.anchor_weight)
        if not s > cfg.min_gain:
            why = f"validation score {s:+.4f} <= min_gain {cfg.min_gain}" if best is None else why
            continue
        if cfg.guard and not (c.drift <= 1 + cfg.guard_tolerance):
            why = (f"guard: the schedule drifts from the un-scheduled images on validation (drift {c.drift:.3f} > "
                   f"{1 + cfg.guard_tolerance:.3f})") if best is None else why  # fmt: skip
            continue
        if s > best_score:
            best, best_score = i, s
    return best, ("" if best is not None else why)


# ---- the guarded fit ----------------------------------------------------------------------------------------
def trust_box(cfg: QSchedConfig, r: float | None) -> QSchedConfig:
    """``cfg`` with its search box cut to the trust region ``[1 - r, 1 + r]`` (``cfg`` itself when r is None)."""
    if r is None:
        return cfg
    return dataclasses.replace(cfg, range_min=max(cfg.range_min, 1 - r), range_max=min(cfg.range_max, 1 + r))


class KeyLog:
    """Cache proxy that records which keys a fit touched (to count distinct generations across radii)."""

    def __init__(self, cache: EvalCache) -> None:
        self.cache, self.keys = cache, set()

    def get(self, key: str):
        self.keys.add(key)
        return self.cache.get(key)

    def put(self, key: str, *args, **kwargs) -> None:
        self.keys.add(key)
        self.cache.put(key, *args, **kwargs)

    def features(self, key: str):
        return self.cache.features(key)


def fit_guarded(
    evaluate: Evaluate,
    cfg: QSchedConfig,
    steps: int,
    num_fit: int,
    num_heldout: int,
    cache: EvalCache | None = None,
    progress: bool = True,
) -> FitResult:
    """:func:`~qdiff.sched.fit.fit` with the anchor term, per trust radius, then the validation guard.

    ``evaluate`` must return image features as a third output when ``cfg.features`` is set, and accept the
    split ``"reference"`` (validation prompts, other seeds) when ``cfg.guard`` is on.
    """
    log = KeyLog(cache or EvalCache(None, {}))
    name = cfg.parameterisation
    ident = rounded_schedule(name, params.identity_theta(name, steps), steps)
    use_features = cfg.features != "none"

    new_gens, results, cands = 0, [], []
    if cfg.anchor_weight > 0 and cfg.reference_steps:
        new_gens += ensure_scored(evaluate, log, ident, ANCHOR_SPLIT, num_fit)
    penalty = anchor_penalty(log, cfg, ident)
    for r in cfg.trust_radius or (None,):
        res = fit(evaluate, trust_box(cfg, r), steps, num_fit, num_heldout, log, progress, penalty)
        new_gens += res.new_generations
        best = rounded_schedule(name, res.theta, steps)
        anchor = drift = math.nan
        if use_features and not best.is_identity:
            anchor = anchor_distance(recorded_features(log, best, "heldout"), recorded_features(log, ident, "heldout"))
        if cfg.guard and not best.is_identity:
            new_gens += ensure_scored(evaluate, log, ident, REFERENCE_SPLIT, num_heldout)
            drift = drift_ratio(recorded_features(log, best, "heldout"), recorded_features(log, ident, "heldout"),
                                recorded_features(log, ident, REFERENCE_SPLIT))  # fmt: skip
        gain = res.heldout_jaq_best - res.heldout_jaq_identity
        results.append(res)
        cands.append(Candidate(r, res.theta, best.is_identity, gain, anchor, drift))
    pick, why = choose(cands, cfg)
    shown = pick if pick is not None else max(range(len(cands)), key=lambda i: cands[i].score(cfg.anchor_weight))
    res, cand = results[shown], cands[shown]
    gens = generations(log, num_fit, num_heldout)
    report = _report(cfg, cands, pick, log, ident, steps, name)
    where = f"{name}/{cfg.optimiser}, {gens} generations"
    if pick is not None:
        sched = rounded_schedule(name, cand.theta, steps)
        jaq_meta = dict(res.schedule.meta.get("jaq", {})) or {
            "fit_identity": res.train_jaq_identity, "fit": res.train_jaq_best,
            "heldout_identity": res.heldout_jaq_identity, "heldout": res.heldout_jaq_best}  # fmt: skip
        meta = {"parameterisation": name, "theta": list(cand.theta), "optimiser": cfg.optimiser, "jaq": jaq_meta,
                "k": cfg.k, "generations": gens, "guard": _guard_meta(cfg, cand)}  # fmt: skip
        extra = _extra(cfg, cand)
        message = (f"Q-Sched: held-out JAQ {res.heldout_jaq_identity:.4f} -> {res.heldout_jaq_best:.4f} "
                   f"(+{cand.gain:.4f}){extra} ({where})")  # fmt: skip
        schedule, accepted = Schedule(sched.c_eps, sched.c_x, meta), True
    else:
        plain = "keeping the plain scheduler" if why.startswith("guard") else "keeping identity coefficients"
        reason = why if why.startswith("guard") else f"no held-out gain ({why})"
        message = f"Q-Sched: {reason}; {plain} ({where})"
        schedule, accepted = Schedule.identity(steps), False
    return dataclasses.replace(res, schedule=schedule, accepted=accepted, message=message, theta=cand.theta,
                               generations=gens, new_generations=new_gens, report=report)  # fmt: skip


def recorded_features(log: KeyLog | EvalCache, sched: Schedule, split: str) -> Tensor:
    """(P, D) float64 image features recorded with ``sched``'s evaluation on ``split``."""
    rows = log.features(coefficient_key(split, sched))
    if rows is None:
        raise QdiffError(f"Q-Sched: no image features recorded for the {split} split (qsched.features is set, "
                         "but the evaluation log holds scores without features; use a new log)")  # fmt: skip
    return torch.tensor(rows, dtype=torch.float64)


def anchor_penalty(log: KeyLog | EvalCache, cfg: QSchedConfig, ident: Schedule):
    """The anchor term as a fit penalty (cache key -> ``w * anchor_distance``), or None when ``anchor_weight`` is 0.

    The anchor is the un-scheduled images of the fitting prompts: at the sampler's own steps (identity costs 0), or
    with ``reference_steps`` the ``anchor`` split drawn at that many steps (which the caller has scored).
    """
    if not cfg.anchor_weight > 0:
        return None
    split = ANCHOR_SPLIT if cfg.reference_steps else "fit"

    def penalty(key: str) -> float:
        if key == coefficient_key(split, ident):
            return 0.0  # exact: FD of a set with itself is 0 up to rounding
        rows = log.features(key)
        if rows is None:
            raise QdiffError("Q-Sched: the anchor term needs image features (qsched.features)")
        return cfg.anchor_weight * anchor_distance(torch.tensor(rows), recorded_features(log, ident, split))

    return penalty


def generations(log: KeyLog, num_fit: int, num_heldout: int) -> int:
    """Images behind the keys a fit touched: fitting-prompt splits count ``num_fit``, the others ``num_heldout``."""
    return sum(num_fit if k.startswith(("fit|", f"{ANCHOR_SPLIT}|")) else num_heldout for k in log.keys)


def ensure_scored(evaluate: Evaluate, log: KeyLog, sched: Schedule, split: str, n: int) -> int:
    """Score ``sched`` on ``split`` unless cached; returns the generations drawn (0 or n)."""
    key = coefficient_key(split, sched)
    if log.get(key) is not None:
        return 0
    a, q, *f = evaluate(sched, split)
    rows = f[0].double().tolist() if f and f[0] is not None else None
    log.put(key, sched, [float(v) for v in a], [float(v) for v in q], rows)
    return n


def _extra(cfg: QSchedConfig, c: Candidate) -> str:
    parts = [f"trust radius {c.radius:g}"] if c.radius is not None else []
    if not math.isnan(c.anchor):
        parts.append(f"validation anchor distance {c.anchor:.4f}")
    if not math.isnan(c.drift):
        parts.append(f"drift {c.drift:.3f} <= {1 + cfg.guard_tolerance:.3f}")
    return f" [{'; '.join(parts)}]" if parts else ""


def _guard_meta(cfg: QSchedConfig, c: Candidate) -> dict[str, Any]:
    return {"features": cfg.features, "anchor_weight": cfg.anchor_weight, "trust_radius": c.radius,
            "guard": cfg.guard, "validation_anchor": _num(c.anchor), "validation_drift": _num(c.drift)}  # fmt: skip


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def split_metrics(log: KeyLog | EvalCache, sched: Schedule, split: str, cfg: QSchedConfig) -> dict[str, float]:
    """Mean alignment, quality, the two JAQ terms and JAQ of ``sched``'s cached scores on ``split``."""
    hit = log.get(coefficient_key(split, sched))
    if hit is None:
        return {}
    a, q = (torch.tensor(v, dtype=torch.float64) for v in hit)
    return {"alignment": float(a.mean()), "quality": float(q.mean()),
            "log_alignment": float(alignment_term(a, cfg.log_alignment)), "quality_term": float(quality_term(q)),
            "jaq": float(jaq(a, q, cfg.k, cfg.log_alignment, cfg.alignment_weight))}  # fmt: skip


def _report(cfg, cands, pick, log, ident, steps, name) -> dict[str, Any]:
    rows = []
    for i, c in enumerate(cands):
        sched = rounded_schedule(name, c.theta, steps)
        rows.append({"trust_radius": c.radius, "c_eps": list(sched.c_eps), "c_x": list(sched.c_x),
                     "heldout": split_metrics(log, sched, "heldout", cfg), "gain": c.gain,
                     "validation_score": c.score(cfg.anchor_weight), "anchor": _num(c.anchor),
                     "drift": _num(c.drift), "chosen": i == pick})  # fmt: skip
    return {"features": cfg.features, "anchor_weight": cfg.anchor_weight, "guard": cfg.guard,
            "guard_tolerance": cfg.guard_tolerance, "reference_steps": cfg.reference_steps,
            "heldout_identity": split_metrics(log, ident, "heldout", cfg), "candidates": rows}  # fmt: skip


def _reference(report: dict[str, Any]) -> str:
    steps = report.get("reference_steps")
    return f"an un-scheduled {steps}-step draw" if steps else "a second un-scheduled draw"


def format_report(report: dict[str, Any]) -> list[str]:
    """Lines for the CLI: validation-split metrics of identity and of every searched schedule."""
    if not report:
        return []
    keys = (("alignment", 10, 4), ("quality", 9, 4), ("log_alignment", 10, 4), ("jaq", 8, 4), ("anchor", 8, 4),
            ("drift", 7, 3))  # fmt: skip
    lines = [f"{'validation':24s} " + " ".join(f"{k.replace('_alignment', '-align'):>{w}s}" for k, w, _ in keys)]

    def row(label: str, m: dict[str, Any]) -> str:
        cells = [f"{m[k]:{w}.{d}f}" if m.get(k) is not None else f"{'-':>{w}s}" for k, w, d in keys]
        return f"{label:24s} " + " ".join(cells)

    features = report["features"] != "none"
    ident = {**report.get("heldout_identity", {}), "anchor": 0.0 if features else None,
             "drift": 1.0 if report["guard"] else None}  # fmt: skip
    lines.append(row("un-scheduled", ident))
    for c in report.get("candidates", []):
        label = "schedule" + (f" r={c['trust_radius']:g}" if c["trust_radius"] is not None else "")
        lines.append(row(label + (" (kept)" if c["chosen"] else ""), {**c["heldout"], **c}))
    for c in report.get("candidates", []):
        if not c["chosen"]:  # what was searched but not installed
            where = f" r={c['trust_radius']:g}" if c["trust_radius"] is not None else ""
            coef = "; ".join(f"{k} {', '.join(f'{v:.4f}' for v in c[k])}" for k in ("c_eps", "c_x"))
            lines.append(f"not kept{where}: {coef}")
    if not features:
        lines.append("distribution metric: not measured (set qsched.features, e.g. shapes-clip, to measure it)")
    else:
        lines.append(
            f"anchor = FD to the un-scheduled images / their variance ({report['features']} features); "
            f"drift = FD to {_reference(report)} / the un-scheduled images' (> 1: moved away)"
        )
    if report.get("families"):
        from qdiff.sched.decision import format_families

        lines += format_families(report["families"])
    return lines
