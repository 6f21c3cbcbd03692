"""Q-Sched with per-family validation and shrinkage toward identity chosen by cross-validation over families.

Issue 25: a guard that pools its validation prompts can accept a schedule that moves one prompt family away from
the model's own distribution. :func:`fit_families` therefore

1. **cross-validates the shrinkage strength over families**: the families of the first attribute in
   ``qsched.families`` found among the fitting prompts are dealt round-robin into ``cv_folds`` folds; for every
   ridge strength ``alpha`` in ``qsched.shrinkage`` and every fold, the search runs on the fitting prompts of the
   other folds with ``alpha * mean((c - 1)^2)`` subtracted from its JAQ (``qdiff.sched.fit``), and the schedule it
   finds is judged on the validation images of the fold's own families (``qdiff.sched.decision``). The kept
   strength is the one whose every fold passes, with the best mean JAQ gain on the held-out families (ties: the
   stronger shrinkage); when none passes, the strongest one is fitted and reported, and the plain scheduler kept;
2. fits on all fitting prompts with that strength;
3. **decides per family**: the schedule is kept only when the FD proxy passes on every validation family and on
   the pooled set; otherwise the plain scheduler is kept and the message names the family that failed.

All evaluations share one cache (folds draw every fitting prompt and score their subset), so points the folds
have in common — identity and the first compass steps — are drawn once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from qdiff.config.recipe import QSchedConfig
from qdiff.errors import QdiffError
from qdiff.sched import params
from qdiff.sched.decision import ALL, FamilyRow, Scores, ValidationGrid, family_rows, verdict
from qdiff.sched.fit import EvalCache, Evaluate, FitResult, coefficient_key, fit, rounded_schedule
from qdiff.sched.guard import (
    ANCHOR_SPLIT,
    REFERENCE_SPLIT,
    KeyLog,
    anchor_penalty,
    ensure_scored,
    generations,
    recorded_features,
    split_metrics,
    trust_box,
)
from qdiff.sched.qsched import Schedule


def cv_folds(labels: Sequence[Mapping[str, str]], attr: str, folds: int) -> list[tuple[tuple[str, ...], list[int]]]:
    """(held-out family values, training prompt indices) per fold: the values of ``attr`` among the fitting prompts,
    sorted, dealt round-robin into ``min(folds, #values)`` folds."""
    values = sorted({row[attr] for row in labels})
    if len(values) < 2:
        raise QdiffError(f"Q-Sched: cross-validation over {attr} families needs at least 2 of them among the fitting "
                         f"prompts, found {values}")  # fmt: skip
    k = min(folds, len(values))
    groups = [tuple(values[i::k]) for i in range(k)]
    return [(g, [i for i, row in enumerate(labels) if row[attr] not in g]) for g in groups]


def fit_families(
    evaluate: Evaluate,
    cfg: QSchedConfig,
    steps: int,
    fit_labels: Sequence[Mapping[str, str]],
    grid: ValidationGrid,
    cache: EvalCache | None = None,
    progress: bool = True,
) -> FitResult:
    """The family-validated fit (module doc). ``evaluate(schedule, split)`` returns per-image alignment, quality
    and features for the splits ``fit`` (``len(fit_labels)`` prompts), ``heldout`` (the grid's images) and
    ``reference`` (the grid's prompts and slots, un-scheduled, other seeds)."""
    log = KeyLog(cache or EvalCache(None, {}))
    name, num_fit, num_val = cfg.parameterisation, len(fit_labels), len(grid.prompt_ids)
    ident = rounded_schedule(name, params.identity_theta(name, steps), steps)
    box = trust_box(cfg, cfg.trust_radius[0] if cfg.trust_radius else None)
    new = ensure_scored(evaluate, log, ident, "heldout", num_val)
    new += ensure_scored(evaluate, log, ident, REFERENCE_SPLIT, num_val)
    plain, reference = _scores(log, ident), recorded_features(log, ident, REFERENCE_SPLIT)
    if cfg.anchor_weight > 0 and cfg.reference_steps:
        new += ensure_scored(evaluate, log, ident, ANCHOR_SPLIT, num_fit)
    penalty = anchor_penalty(log, cfg, ident)

    def search(subset: list[int] | None, alpha: float) -> tuple[FitResult, Schedule]:
        nonlocal new
        res = fit(evaluate, box, steps, num_fit, num_val, log, progress, penalty, subset=subset, ridge=alpha)
        new += res.new_generations
        return res, rounded_schedule(name, res.theta, steps)

    def rows(sched: Schedule, only: Sequence[str] | None = None) -> list[FamilyRow]:
        if sched.is_identity:
            return []
        return family_rows(_scores(log, sched), plain, reference, grid, cfg, only)

    cv, passing, chosen = [], [], 0.0
    if cfg.shrinkage:
        attr = cfg.families[0]
        folds = cv_folds(fit_labels, attr, cfg.cv_folds)
        for alpha in cfg.shrinkage:
            entry: dict[str, Any] = {"alpha": alpha, "folds": []}
            for values, train in folds:
                names = [f"{attr}={v}" for v in values if f"{attr}={v}" in grid.families]
                _, sched = search(train, alpha)
                fold_rows = rows(sched, names)
                entry["folds"].append({"held_out": names, "c_eps": list(sched.c_eps), "c_x": list(sched.c_x),
                                       "rows": [r.to_dict() for r in fold_rows],
                                       "passed": all(r.passed for r in fold_rows)})  # fmt: skip
            entry["passed"] = all(f["passed"] for f in entry["folds"])
            gains = [r["jaq"]["value"] for f in entry["folds"] for r in f["rows"]]
            entry["gain"] = sum(gains) / len(gains) if gains else 0.0
            cv.append(entry)
        passing = [e for e in cv if e["passed"]]
        pick = max(passing, key=lambda e: (e["gain"], e["alpha"])) if passing else cv[-1]
        chosen = pick["alpha"]
    res, sched = search(None, chosen)
    table = rows(sched)
    cv_ok = not cv or bool(passing)
    ok, why = verdict(table, cfg)
    if sched.is_identity:
        ok, why = False, "the search found nothing better than identity" + _cv_note(cv, chosen)
    elif not cv_ok:
        ok, why = False, (f"no shrinkage strength in {list(cfg.shrinkage)} kept every held-out family within the FD "
                          f"proxy in cross-validation over {cfg.families[0]} families")  # fmt: skip
    gens = generations(log, num_fit, num_val)
    where = f"{name}/{cfg.optimiser}, shrinkage {chosen:g}, {gens} generations"
    report = _report(cfg, log, ident, sched, table, cv, chosen, ok)
    if ok:
        meta = {"parameterisation": name, "theta": list(res.theta), "optimiser": cfg.optimiser, "k": cfg.k,
                "generations": gens, "shrinkage": chosen,
                "jaq": {"fit_identity": res.train_jaq_identity, "fit": res.train_jaq_best,
                        "heldout_identity": res.heldout_jaq_identity, "heldout": res.heldout_jaq_best},
                "families": report["families"]}  # fmt: skip
        worst = max(table, key=lambda r: r.excess)
        message = (f"Q-Sched: every prompt family passed ({len(table)} incl. {ALL}; worst {worst.family}: FD proxy "
                   f"upper end {worst.fd.high:+.4f}); held-out JAQ {res.heldout_jaq_identity:.4f} -> "
                   f"{res.heldout_jaq_best:.4f} ({where})")  # fmt: skip
        schedule = Schedule(sched.c_eps, sched.c_x, meta)
    else:
        message = f"Q-Sched: {why}; keeping the plain scheduler ({where})"
        schedule = Schedule.identity(steps)
    return dataclasses.replace(res, schedule=schedule, accepted=ok, message=message, generations=gens,
                               new_generations=new, report=report)  # fmt: skip


def _cv_note(cv: list[dict[str, Any]], chosen: float) -> str:
    """Why cross-validation chose ``chosen``: the weaker strengths and the held-out families they moved."""
    failed = [e for e in cv if e["alpha"] < chosen and not e["passed"]]
    if not failed:
        return ""
    moved = "; ".join(f"{e['alpha']:g}: " + ", ".join(n for f in e["folds"] if not f["passed"] for n in f["held_out"])
                      for e in failed)  # fmt: skip
    return f" at shrinkage {chosen:g}, chosen by cross-validation (weaker strengths moved held-out families: {moved})"


def _scores(log: KeyLog, sched: Schedule) -> Scores:
    a, q = log.get(coefficient_key("heldout", sched))
    return Scores(a, q, recorded_features(log, sched, "heldout"))


def _report(cfg, log, ident, sched, table, cv, chosen, ok) -> dict[str, Any]:
    """The guard report (``qdiff.sched.guard.format_report``'s layout) plus the per-family table."""
    heldout = split_metrics(log, sched, "heldout", cfg) if not sched.is_identity else {}
    heldout_identity = split_metrics(log, ident, "heldout", cfg)
    pooled = next((r for r in table if r.family == ALL), None)
    gain = heldout["jaq"] - heldout_identity["jaq"] if heldout else 0.0
    candidate = {"trust_radius": cfg.trust_radius[0] if cfg.trust_radius else None, "c_eps": list(sched.c_eps),
                 "c_x": list(sched.c_x), "heldout": heldout, "gain": gain, "validation_score": None, "anchor": None,
                 "drift": None if pooled is None or not pooled.floor else 1 + pooled.fd.value / pooled.floor,
                 "chosen": ok}  # fmt: skip
    families = {"attributes": list(cfg.families), "confidence": cfg.confidence, "tolerance": cfg.family_tolerance,
                "bootstrap": cfg.bootstrap, "validation_seeds": cfg.validation_seeds, "shrinkage": chosen,
                "rows": [r.to_dict() for r in table], "cv": cv, "kept": ok}  # fmt: skip
    return {"features": cfg.features, "anchor_weight": cfg.anchor_weight, "guard": True,
            "guard_tolerance": cfg.guard_tolerance, "reference_steps": cfg.reference_steps,
            "heldout_identity": heldout_identity, "candidates": [candidate],
            "families": families}  # fmt: skip
