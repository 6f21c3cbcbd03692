"""The per-family decision and shrinkage (issue 25) on synthetic scorers and features with a known answer: a
schedule that helps one family and moves another family's pictures is rejected (the failing family named), and
shrinkage chosen by cross-validation over families pulls it back far enough to be kept."""

from __future__ import annotations

import math

import pytest
import torch

from qdiff.config.recipe import QSchedConfig
from qdiff.sched.decision import ValidationGrid, format_families, verdict
from qdiff.sched.family_fit import cv_folds, fit_families
from qdiff.sched.guard import format_report
from qdiff.sched.qsched import Schedule

STEPS, DIM, SEEDS = 2, 4, 2
TARGET = torch.tensor([0.9, 1.0, 1.1, 1.0], dtype=torch.float64)  # c_eps[0], c_eps[1], c_x[0], c_x[1]
FIT = [{"background": b} for b in ["black", "white"] * 5]  # 10 fitting prompts
VAL = [{"background": b} for b in ["black", "white"] * 6]  # 12 validation prompts x 2 seeds


class TwoFamilies:
    """JAQ rewards moving towards TARGET (on ``helped`` images only, when set); the features of ``hurt`` images
    move by ``drift * max(|c - 1|_1 - free, 0)`` in every dimension, the others' never move."""

    def __init__(self, drift=10.0, free=0.0, helped=None, hurt="white"):
        g = torch.Generator().manual_seed(0)
        n = {"fit": len(FIT), "heldout": len(VAL) * SEEDS, "reference": len(VAL) * SEEDS}
        self.base = {s: torch.randn(k, DIM, generator=g, dtype=torch.float64) for s, k in n.items()}
        fam = {"fit": [r["background"] for r in FIT], "heldout": [r["background"] for r in VAL] * SEEDS}
        fam["reference"] = fam["heldout"]
        self.fam, self.drift, self.free, self.helped, self.hurt = fam, drift, free, helped, hurt

    def __call__(self, sched: Schedule, split: str):
        c = torch.tensor(sched.c_eps + sched.c_x, dtype=torch.float64)
        d = float(((c - TARGET) ** 2).sum())
        fam = self.fam[split]
        gain = torch.tensor([1.0 if self.helped in (None, f) else 0.0 for f in fam], dtype=torch.float64)
        align = torch.exp(3.0 - 40.0 * d * gain - 40.0 * 0.02 * (1 - gain))  # un-helped images: identity's score
        move = self.drift * max(float((c - 1).abs().sum()) - self.free, 0.0)
        feats = self.base[split] + move * torch.tensor([[1.0 if f == self.hurt else 0.0] for f in fam])
        return align, torch.zeros(len(fam), dtype=torch.float64), feats


def _cfg(**kw) -> QSchedConfig:
    base = {"parameterisation": "per_step", "optimiser": "coordinate", "k": 0.0, "features": "pixels",
            "guard": True, "families": ("background",), "validation_seeds": SEEDS, "bootstrap": 300, "budget": 200,
            "num_prompts": len(FIT), "heldout_prompts": len(VAL)}  # fmt: skip
    return QSchedConfig(**{**base, **kw})


GRID = ValidationGrid.build(VAL, ["background"], SEEDS)


def test_validation_grid_indexes_prompts_seeds_and_families():
    assert GRID.prompt_ids == tuple(range(12)) * 2 and GRID.seed_ids == (0,) * 12 + (1,) * 12
    assert GRID.families["background=white"] == (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23)
    assert GRID.families["all"] == tuple(range(24)) and GRID.family_prompts("background=black") == {0, 2, 4, 6, 8, 10}


def test_schedule_that_helps_one_family_and_hurts_another_is_rejected():
    res = fit_families(TwoFamilies(helped="black", hurt="white"), _cfg(), STEPS, FIT, GRID, progress=False)
    assert not res.accepted and res.schedule.is_identity
    assert "family background=white failed" in res.message and "keeping the plain scheduler" in res.message
    rows = {r["family"]: r for r in res.report["families"]["rows"]}
    assert rows["background=black"]["passed"] and rows["background=black"]["jaq"]["low"] > 0  # helped, unmoved
    assert rows["background=black"]["fd"]["high"] == 0.0  # paired: its pictures did not move at all
    white = rows["background=white"]
    assert not white["passed"] and white["fd"]["low"] > 0 and white["jaq"]["value"] == pytest.approx(0.0)
    text = "\n".join(format_report(res.report))
    assert "background=white" in text and "FAIL" in text and "plain scheduler kept" in text


def test_a_schedule_that_moves_no_family_is_kept_and_records_the_table():
    res = fit_families(TwoFamilies(drift=0.0), _cfg(), STEPS, FIT, GRID, progress=False)
    assert res.accepted and "every prompt family passed" in res.message
    fam = res.schedule.meta["families"]
    assert [r["family"] for r in fam["rows"]] == ["all", "background=black", "background=white"]
    assert all(r["passed"] and r["fd"]["high"] == 0.0 and r["jaq"]["low"] > 0 for r in fam["rows"])
    assert torch.allclose(torch.tensor(res.schedule.c_eps + res.schedule.c_x, dtype=torch.float64), TARGET, atol=0.02)


def test_cross_validated_shrinkage_pulls_the_schedule_back_until_every_family_passes():
    ev = TwoFamilies(free=0.11)  # moves of |c - 1|_1 <= 0.11 leave every family's pictures where they were
    plain = fit_families(ev, _cfg(), STEPS, FIT, GRID, progress=False)
    assert not plain.accepted and "background=white failed" in plain.message  # unshrunk: |c - 1|_1 ~ 0.2
    res = fit_families(ev, _cfg(shrinkage=(0.0, 400.0)), STEPS, FIT, GRID, progress=False)
    cv = res.report["families"]["cv"]
    assert [e["passed"] for e in cv] == [False, True] and res.report["families"]["shrinkage"] == 400.0
    assert res.accepted and res.schedule.meta["shrinkage"] == 400.0
    moved = sum(abs(v - 1) for v in res.schedule.c_eps + res.schedule.c_x)
    assert 0.0 < moved <= 0.11  # pulled towards identity (the ridge optimum: |c - 1|_1 = 0.057), not to it
    assert all(r["passed"] for r in res.report["families"]["rows"])
    assert "cross-validation shrinkage 400 (kept)" in "\n".join(format_families(res.report["families"]))


def test_no_strength_passing_keeps_the_plain_scheduler_and_says_why():
    res = fit_families(TwoFamilies(), _cfg(shrinkage=(0.0, 1.0)), STEPS, FIT, GRID, progress=False)
    assert not res.accepted and "no shrinkage strength in [0.0, 1.0]" in res.message
    res = fit_families(TwoFamilies(), _cfg(shrinkage=(0.0, 1e6)), STEPS, FIT, GRID, progress=False)  # all the way
    why = "identity at shrinkage 1e+06, chosen by cross-validation (weaker strengths moved held-out families: 0: "
    assert not res.accepted and why + "background=white)" in res.message


def test_cv_folds_deal_families_round_robin():
    labels = [{"t": v} for v in "abcdeab"]
    want = [(("a", "d"), [1, 2, 4, 6]), (("b", "e"), [0, 2, 3, 5]), (("c",), [0, 1, 3, 4, 5, 6])]
    assert cv_folds(labels, "t", 3) == want
    with pytest.raises(Exception, match="at least 2"):
        cv_folds([{"t": "a"}], "t", 3)


def test_verdict_names_the_worst_family():
    from qdiff.sched.bootstrap import Interval
    from qdiff.sched.decision import FamilyRow

    def row(name, high, floor=1.0):
        iv = Interval(high / 2, -0.1, high, 0.95)
        return FamilyRow(name, 10, floor, iv, iv, iv, passed=high <= 0)

    ok, why = verdict([row("a", -0.1), row("b", 0.2), row("c", 0.3, floor=0.5)], _cfg())
    assert not ok and why.startswith("family c failed and 1 other family") and math.isfinite(len(why))
    assert verdict([row("a", 0.0)], _cfg()) == (True, "")


def test_a_family_passes_only_when_the_upper_end_is_within_the_tolerance():
    from qdiff.sched.decision import Scores, family_rows

    g = torch.Generator().manual_seed(3)
    plain, ref = torch.randn(24, DIM, generator=g), torch.randn(24, DIM, generator=g)
    sched = plain + 0.4 * torch.randn(24, DIM, generator=g)  # paired noise: an interval around a small change
    ones = [1.0] * 24
    s, p = Scores(ones, [0.0] * 24, sched.tolist()), Scores(ones, [0.0] * 24, plain.tolist())
    (row,) = family_rows(s, p, ref.tolist(), GRID, _cfg(), only=["all"])
    assert row.fd.low < row.fd.value < row.fd.high and row.passed == (row.fd.high <= 0)
    edge = row.fd.high / row.floor
    (above,) = family_rows(s, p, ref.tolist(), GRID, _cfg(family_tolerance=edge * 1.001), only=["all"])
    (below,) = family_rows(s, p, ref.tolist(), GRID, _cfg(family_tolerance=edge * 0.999), only=["all"])
    assert above.passed and not below.passed  # the upper end decides, not the point value
