"""The per-family decision (issue 25): is a schedule not worse than the plain scheduler on every prompt family?

The validation images form a grid: validation prompt ``i`` drawn with seed slot ``j`` (image ``j * V + i``), once
with the schedule and once without it (the same prompts and seeds: a paired comparison), plus a *reference* draw
of the un-scheduled sampler with other seeds. Per family (``qdiff.sched.families``) and for the pooled set
(``all``):

* the FD proxy: ``FD(schedule, reference) - FD(plain, reference)`` in image features — how much further the
  schedule moves the family's pictures from the model's own un-scheduled distribution than the plain sampler
  (whose FD to the reference, the *floor*, is pure seed noise) — with its paired bootstrap interval over
  prompts and seeds (``qdiff.sched.bootstrap``);
* the alignment and JAQ differences (reported; the fit's objective).

A family *passes* when the upper end of the proxy's interval is at most ``family_tolerance * floor`` (0: not
worse at the interval's confidence). A schedule is kept only when every family passes; otherwise the decision
names the family that failed worst.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qdiff.config.recipe import QSchedConfig
from qdiff.errors import QdiffError
from qdiff.sched.bootstrap import Interval, paired_fd, paired_mean_difference
from qdiff.sched.families import family_index
from qdiff.sched.jaq import LOG_EPS

ALL = "all"


@dataclass(frozen=True)
class ValidationGrid:
    """Which validation image is which: prompt and seed slot per image, and the images of every family."""

    prompt_ids: tuple[int, ...]
    seed_ids: tuple[int, ...]
    families: Mapping[str, tuple[int, ...]]  # "attr=value" (and "all") -> image indices

    @classmethod
    def build(cls, labels: Sequence[Mapping[str, str]], by: Sequence[str], seeds: int) -> ValidationGrid:
        """Grid of ``len(labels)`` validation prompts x ``seeds`` slots (image ``j * V + i``)."""
        v = len(labels)
        fam = {ALL: tuple(range(v * seeds))}
        for name, prompts in family_index(labels, by).items():
            fam[name] = tuple(j * v + i for j in range(seeds) for i in prompts)
        return cls(tuple(list(range(v)) * seeds), tuple(j for j in range(seeds) for _ in range(v)), fam)

    def family_prompts(self, name: str) -> set[int]:
        return {self.prompt_ids[k] for k in self.families[name]}


@dataclass(frozen=True)
class Scores:
    """Per-image alignment, quality and features of one sampler on the validation grid."""

    alignment: Sequence[float]
    quality: Sequence[float]
    features: Sequence[Sequence[float]] | torch.Tensor


@dataclass(frozen=True)
class FamilyRow:
    family: str
    images: int
    floor: float  # FD(plain, reference): seed noise
    fd: Interval  # FD(schedule, reference) - FD(plain, reference)
    alignment: Interval  # mean alignment score, schedule - plain
    jaq: Interval  # JAQ, schedule - plain
    passed: bool

    @property
    def excess(self) -> float:
        """How far the interval's upper end is above the allowance, in units of the floor (<= 0: passed)."""
        return self.fd.high / self.floor if self.floor > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "images": self.images, "floor": self.floor, "fd": self.fd.to_dict(),
                "alignment": self.alignment.to_dict(), "jaq": self.jaq.to_dict(), "passed": self.passed}  # fmt: skip


def _jaq_terms(s: Scores, cfg: QSchedConfig) -> np.ndarray:
    a = np.asarray(s.alignment, dtype=np.float64)
    a = np.log(np.maximum(a, LOG_EPS)) if cfg.log_alignment else a
    return cfg.alignment_weight * a + cfg.k * np.asarray(s.quality, dtype=np.float64)


def family_rows(sched: Scores, plain: Scores, reference: Sequence[Sequence[float]], grid: ValidationGrid,
                cfg: QSchedConfig, only: Sequence[str] | None = None) -> list[FamilyRow]:  # fmt: skip
    """One row per family of ``grid`` (or of ``only``): the paired differences of ``sched`` against ``plain``."""
    x, y, ref = (torch.as_tensor(v, dtype=torch.float64) for v in (sched.features, plain.features, reference))
    if not x.shape == y.shape == ref.shape or x.shape[0] != len(grid.prompt_ids):
        raise QdiffError(f"Q-Sched families: features {tuple(x.shape)}, {tuple(y.shape)}, {tuple(ref.shape)} for a "
                         f"grid of {len(grid.prompt_ids)} validation images")  # fmt: skip
    ja, jp = _jaq_terms(sched, cfg), _jaq_terms(plain, cfg)
    al_s, al_p = np.asarray(sched.alignment, dtype=np.float64), np.asarray(plain.alignment, dtype=np.float64)
    boot = {"n_boot": cfg.bootstrap, "seed": cfg.seed, "level": cfg.confidence}
    rows = []
    for name in only if only is not None else list(grid.families):
        idx = list(grid.families[name])
        if len(idx) < 2:
            raise QdiffError(f"Q-Sched families: family {name} has {len(idx)} validation image(s); need >= 2 "
                             "(more heldout_prompts or validation_seeds, or fewer families)")  # fmt: skip
        p_ids, s_ids = [grid.prompt_ids[k] for k in idx], [grid.seed_ids[k] for k in idx]
        fd, floor = paired_fd(x[idx], y[idx], ref[idx], p_ids, s_ids, **boot)
        rows.append(FamilyRow(
            family=name, images=len(idx), floor=floor, fd=fd,
            alignment=paired_mean_difference(al_s[idx], al_p[idx], p_ids, s_ids, **boot),
            jaq=paired_mean_difference(ja[idx], jp[idx], p_ids, s_ids, **boot),
            passed=fd.high <= cfg.family_tolerance * floor,
        ))  # fmt: skip
    return rows


def verdict(rows: Sequence[FamilyRow], cfg: QSchedConfig) -> tuple[bool, str]:
    """(every family passed, why not: the worst failing family — the pooled set only when no named family failed —
    and how many failed)."""
    failed = [r for r in rows if not r.passed]
    if not failed:
        return True, ""
    worst = min(failed, key=lambda r: (r.family == ALL, -r.excess))  # a named family before the pooled set
    pct = round(100 * cfg.confidence)
    allowed = f"{cfg.family_tolerance * worst.floor:.4f}" if cfg.family_tolerance else "0"
    others = f" and {len(failed) - 1} other famil{'y' if len(failed) == 2 else 'ies'}" if len(failed) > 1 else ""
    fd = worst.fd
    return False, (f"family {worst.family} failed{others}: FD proxy {fd.value:+.4f} [{pct}% interval "
                   f"{fd.low:+.4f}, {fd.high:+.4f}] above {allowed} (floor {worst.floor:.4f})")  # fmt: skip


def format_rows(rows: Sequence[Mapping[str, Any]], confidence: float) -> list[str]:
    """Table lines of :meth:`FamilyRow.to_dict` rows (the CLI's per-family table)."""
    pct = round(100 * confidence)
    head = (f"{'family':22s} {'images':>6s} {'floor':>8s}  {'FD proxy [' + str(pct) + '% interval]':>32s}  "
            f"{'alignment [' + str(pct) + '% interval]':>30s}  result")  # fmt: skip
    lines = [head]
    for r in rows:
        fd, al = r["fd"], r["alignment"]
        lines.append(f"{r['family']:22s} {r['images']:6d} {r['floor']:8.4f}  "
                     f"{fd['value']:+9.4f} [{fd['low']:+9.4f}, {fd['high']:+9.4f}]  "
                     f"{al['value']:+8.3f} [{al['low']:+8.3f}, {al['high']:+8.3f}]  "
                     f"{'pass' if r['passed'] else 'FAIL'}")  # fmt: skip
    return lines


def format_families(fam: Mapping[str, Any]) -> list[str]:
    """The per-family table of a family-validated fit's report, with its cross-validation summary."""
    pct = round(100 * fam["confidence"])
    lines = [f"per family (validation, {fam['validation_seeds']} seed(s) per prompt; FD proxy = FD(schedule, "
             f"reference) - FD(plain, reference); pass: upper end <= {fam['tolerance']:g} x floor)"]  # fmt: skip
    lines += format_rows(fam["rows"], fam["confidence"]) if fam["rows"] else ["(no schedule to judge: identity)"]
    for e in fam.get("cv", []):
        held = "; ".join(f"{'+'.join(f['held_out']) or '-'} {'pass' if f['passed'] else 'FAIL'}" for f in e["folds"])
        mark = " (kept)" if e["alpha"] == fam["shrinkage"] else ""
        lines.append(f"cross-validation shrinkage {e['alpha']:g}{mark}: held-out families {held}; mean JAQ gain on "
                     f"them {e['gain']:+.4f}")  # fmt: skip
    lines.append(f"decision: {'schedule kept' if fam['kept'] else 'plain scheduler kept'} ({pct}% paired bootstrap "
                 f"over prompts and seeds, {fam['bootstrap']} replicates)")  # fmt: skip
    return lines
