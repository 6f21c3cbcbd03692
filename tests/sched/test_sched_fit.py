"""fit(): budget accounting, resume from the JSONL log, held-out refusal — on a synthetic scorer."""

from __future__ import annotations

import json

import pytest
import torch

from qdiff.config.recipe import QSchedConfig
from qdiff.errors import QdiffError
from qdiff.sched.fit import EvalCache, fit
from qdiff.sched.qsched import Schedule

STEPS, P_FIT, P_HELD = 2, 3, 2
TARGET = torch.tensor([0.92, 1.0, 1.07, 1.0], dtype=torch.float64)  # c_eps[0], c_eps[1], c_x[0], c_x[1]


class Synthetic:
    """Scores peaked at TARGET on the fitting split; ``held_target`` for the held-out split."""

    def __init__(self, held_target=TARGET, fail_after: int | None = None):
        self.held_target, self.fail_after, self.calls = held_target, fail_after, 0

    def __call__(self, sched: Schedule, split: str):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # an interrupted run
        self.calls += 1
        c = torch.tensor(sched.c_eps + sched.c_x, dtype=torch.float64)
        target = TARGET if split == "fit" else self.held_target
        n = P_FIT if split == "fit" else P_HELD
        align = torch.exp(3.0 - 40.0 * ((c - target) ** 2).sum()) * torch.linspace(1.0, 1.2, n, dtype=torch.float64)
        quality = -((c - target) ** 2).sum().expand(n)
        return align, quality


def run(cfg, evaluate, cache=None):
    return fit(evaluate, cfg, STEPS, P_FIT, P_HELD, cache, progress=False)


def test_grid_counts_generations_and_accepts_a_real_gain():
    ev = Synthetic()
    res = run(QSchedConfig(), ev)
    assert res.evaluations == 101 and res.generations == 101 * P_FIT + 2 * P_HELD == res.new_generations
    assert res.accepted and not res.schedule.is_identity and "held-out JAQ" in res.message
    assert res.heldout_jaq_best > res.heldout_jaq_identity and res.train_jaq_best > res.train_jaq_identity
    assert res.schedule.c_eps[-1] == 1.0 and res.schedule.c_x[-1] == 1.0  # ramp ends fixed at 1
    assert [g for g, _ in res.curve] == sorted(g for g, _ in res.curve)
    assert all(b >= a for (_, a), (_, b) in zip(res.curve, res.curve[1:]))  # best-so-far never drops


@pytest.mark.parametrize("optimiser", ["cmaes", "coordinate"])
def test_per_step_optimisers_default_to_20_percent_of_grid(optimiser):
    res = run(QSchedConfig(parameterisation="per_step", optimiser=optimiser), Synthetic())
    assert res.generations - 2 * P_HELD <= 0.2 * 100 * P_FIT  # default budget: 20% of the 10x10 grid
    assert res.accepted and res.train_jaq_best > res.train_jaq_identity


def test_heldout_refusal_returns_identity():
    ev = Synthetic(held_target=torch.ones(4, dtype=torch.float64))  # held-out prompts prefer identity
    res = run(QSchedConfig(), ev)
    assert res.train_jaq_best > res.train_jaq_identity  # the fitting prompts "improve" ...
    assert res.heldout_jaq_best < res.heldout_jaq_identity  # ... the held-out ones do not
    assert not res.accepted and res.schedule.is_identity and res.schedule.steps == STEPS
    assert "no held-out gain" in res.message and "keeping identity" in res.message
    strict = run(QSchedConfig(min_gain=1e6), Synthetic())
    assert not strict.accepted and strict.schedule.is_identity


def test_resume_from_log_is_identical(tmp_path):
    cfg = QSchedConfig(parameterisation="ramp4", optimiser="cmaes", budget=45)
    log = tmp_path / "fit.jsonl"
    fp = {"model": "synthetic"}
    full = run(cfg, Synthetic(), EvalCache(tmp_path / "ref.jsonl", fp))
    interrupted = Synthetic(fail_after=7)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, interrupted, EvalCache(log, fp))
    assert len(log.read_text().splitlines()) == 1 + 7
    with open(log, "a") as f:
        f.write('{"type": "eval", "key": "torn')  # a write cut short by the interruption
    ev = Synthetic()
    resumed = run(cfg, ev, EvalCache(log, fp))
    assert resumed.new_generations == full.new_generations - 7 * P_FIT
    replay = Synthetic()
    again = run(cfg, replay, EvalCache(log, fp))
    assert replay.calls == 0 and again.new_generations == 0
    for r in (resumed, again):
        a, b = r.to_dict(), full.to_dict()
        a.pop("new_generations"), b.pop("new_generations")
        assert a == b
    with pytest.raises(QdiffError, match="different fit setup \\(model differ\\)"):
        EvalCache(log, {"model": "other"})


def test_log_lines_are_json_with_scores(tmp_path):
    log = tmp_path / "fit.jsonl"
    res = run(QSchedConfig(grid_size=2), Synthetic(), EvalCache(log, {"m": 1}))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["fingerprint"] == {"m": 1}
    held = 1 if res.schedule.is_identity else 2  # identity (+ the best point when it differs) on held-out prompts
    assert len(lines) == 1 + (1 + 4) + held and len(lines[1]["alignment"]) == P_FIT


def test_recipe_section_validation():
    from qdiff.config.recipe import Recipe

    with pytest.raises(QdiffError, match="recipe: qsched.optimiser: got 'adam'"):
        Recipe.from_dict({"qsched": {"optimiser": "adam"}})
    with pytest.raises(QdiffError, match="recipe: qsched.optimiser: grid searches the 2-value ramp only"):
        Recipe.from_dict({"qsched": {"parameterisation": "per_step"}})
    with pytest.raises(QdiffError, match="recipe: qsched.range_min"):
        Recipe.from_dict({"qsched": {"range_min": 1.1}})
    with pytest.raises(QdiffError, match="recipe: qsched.heldout_prompts: must be > 0"):
        Recipe.from_dict({"qsched": {"heldout_prompts": 0}})
    r = Recipe.from_dict({"qsched": {"enabled": True, "optimiser": "cmaes", "budget": 40, "quality": "pyiqa:piqe"}})
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(QdiffError, match="qsched.budget: the 10x10 grid needs 300 generations, got 10"):
        run(QSchedConfig(budget=10), Synthetic())
