"""Q-Sched guards: Fréchet math against float64 references, the keep/reject logic, the guarded fit on a synthetic
scorer whose best schedule drifts, features, the evaluation log and the recipe fields."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qdiff.config.recipe import QSchedConfig, Recipe
from qdiff.errors import QdiffError
from qdiff.sched.features import make_features, pixel_statistics
from qdiff.sched.fit import EvalCache, fit
from qdiff.sched.guard import Candidate, anchor_distance, choose, drift_ratio, fit_guarded, frechet_distance
from qdiff.sched.jaq import jaq
from qdiff.sched.qsched import Schedule

STEPS, P_FIT, P_HELD, DIM = 2, 6, 8, 5
TARGET = torch.tensor([0.9, 1.0, 1.1, 1.0], dtype=torch.float64)  # c_eps[0], c_eps[1], c_x[0], c_x[1]


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_float64_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 6))
    b = rng.standard_normal((30, 6)) @ rng.standard_normal((6, 6)) * 0.7 + 0.3
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(scipy_frechet(a, b), rel=1e-9)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([0.5, -1.0, 0.0, 2.0, 0.0, 0.0])  # a pure mean shift costs |shift|^2
    assert frechet_distance(torch.from_numpy(a + shift), torch.from_numpy(a)) == pytest.approx(5.25, rel=1e-9)


def test_frechet_rank_deficient_few_samples_and_errors():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 10)), rng.standard_normal((5, 10))  # covariances of rank 3 and 4
    fd = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert math.isfinite(fd) and fd == pytest.approx(frechet_distance(torch.from_numpy(b), torch.from_numpy(a)))
    with pytest.raises(QdiffError, match="feature sizes differ"):
        frechet_distance(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(QdiffError, match=r"N >= 2"):
        frechet_distance(torch.zeros(1, 2), torch.zeros(3, 2))


def test_anchor_distance_is_relative_and_drift_ratio_is_one_for_identity():
    rng = np.random.default_rng(2)
    x, y, ref = (torch.from_numpy(rng.standard_normal((12, 4))) for _ in range(3))
    var = float(np.trace(np.cov(x.numpy(), rowvar=False)))
    assert anchor_distance(y, x) == pytest.approx(scipy_frechet(y.numpy(), x.numpy()) / var, rel=1e-9)
    assert anchor_distance(3 * y, 3 * x) == pytest.approx(anchor_distance(y, x), rel=1e-9)  # scale-free
    assert drift_ratio(x, x, ref) == 1.0
    assert drift_ratio(x + 2.0, x, ref) > 1.0
    with pytest.raises(QdiffError, match="no variance"):
        anchor_distance(y, torch.ones(5, 4, dtype=torch.float64))


def C(gain, drift=math.nan, anchor=math.nan, identity=False, radius=None):
    return Candidate(radius, (1.0,), identity, gain, anchor, drift)


@pytest.mark.parametrize(
    ("cands", "cfg", "pick", "why"),
    [
        ([C(0.1)], {}, 0, ""),
        ([C(0.1, identity=True)], {}, None, "nothing better than identity"),
        ([C(-0.1)], {}, None, "min_gain"),
        ([C(0.1, drift=1.3)], {"guard": True}, None, "guard: the schedule drifts"),
        ([C(0.1, drift=1.3)], {"guard": True, "guard_tolerance": 0.5}, 0, ""),
        ([C(0.1, drift=1.3)], {}, 0, ""),  # no guard: drift is only reported
        ([C(0.3, drift=1.3), C(0.1, drift=0.9)], {"guard": True}, 1, ""),  # the best feasible one
        ([C(0.1, drift=0.9), C(0.3, drift=0.95)], {"guard": True}, 1, ""),
        ([C(0.3, anchor=0.2), C(0.2, anchor=0.01)], {"anchor_weight": 1.0}, 1, ""),  # 0.3-0.2 < 0.2-0.01
        ([C(0.1, drift=math.nan)], {"guard": True}, None, "guard"),  # unknown drift never passes
    ],
)
def test_choose_keeps_or_rejects(cands, cfg, pick, why):
    base = {"features": "pixels"} if cfg.get("guard") or cfg.get("anchor_weight") else {}
    got, reason = choose(cands, QSchedConfig(**base, **cfg))
    assert got == pick and why in reason


class Drifting:
    """Synthetic scorers that reward moving towards TARGET, and features that drift with |c - 1| (or not)."""

    def __init__(self, drift: float = 3.0):
        g = torch.Generator().manual_seed(0)
        self.base = {s: torch.randn(P_FIT if s == "fit" else P_HELD, DIM, generator=g, dtype=torch.float64)
                     for s in ("fit", "heldout", "reference")}  # fmt: skip
        self.drift, self.calls = drift, []

    def __call__(self, sched: Schedule, split: str):
        self.calls.append(split)
        c = torch.tensor(sched.c_eps + sched.c_x, dtype=torch.float64)
        n = P_FIT if split == "fit" else P_HELD
        d = ((c - TARGET) ** 2).sum()
        feats = self.base[split] + self.drift * (c - 1).abs().sum()
        return torch.exp(3.0 - 40.0 * d).expand(n).clone(), -d.expand(n).clone(), feats


def test_guard_keeps_the_plain_scheduler_when_the_schedule_drifts():
    cfg = QSchedConfig(parameterisation="per_step", optimiser="coordinate", features="pixels", guard=True)
    res = fit_guarded(Drifting(), cfg, STEPS, P_FIT, P_HELD, progress=False)
    assert not res.accepted and res.schedule.is_identity
    assert "guard: the schedule drifts" in res.message and "keeping the plain scheduler" in res.message
    (row,) = res.report["candidates"]
    assert row["drift"] > 1.0 and row["gain"] > 0 and not row["chosen"]  # JAQ gained, but the pictures moved


def test_guard_accepts_when_the_distribution_does_not_move():
    ev = Drifting(drift=0.0)  # features independent of the coefficients: drift ratio exactly 1
    cfg = QSchedConfig(parameterisation="per_step", optimiser="coordinate", features="pixels", guard=True)
    res = fit_guarded(ev, cfg, STEPS, P_FIT, P_HELD, progress=False)
    assert res.accepted and "drift 1.000 <= 1.000" in res.message
    assert res.schedule.meta["guard"]["validation_drift"] == 1.0
    assert ev.calls.count("reference") == 1  # the second un-scheduled draw, once
    ids = res.report["heldout_identity"]
    assert ids["jaq"] == pytest.approx(ids["log_alignment"] + 0.05 * 0 + 2.0 * ids["quality_term"])


def test_plain_config_reproduces_fit_exactly():
    ev1, ev2 = Drifting(), Drifting()
    cfg = QSchedConfig(parameterisation="per_step", optimiser="coordinate")
    strip = lambda e: lambda s, split: e(s, split)[:2]  # noqa: E731 - scores only, as before the guards
    plain = fit(strip(ev1), cfg, STEPS, P_FIT, P_HELD, progress=False)
    res = fit_guarded(strip(ev2), cfg, STEPS, P_FIT, P_HELD, progress=False)
    assert res.schedule == plain.schedule and res.message == plain.message and res.theta == plain.theta
    assert res.generations == plain.generations and res.curve == plain.curve
    assert res.report["candidates"][0]["chosen"] and res.report["features"] == "none"


def test_anchor_term_pulls_the_fit_towards_identity():
    cfg = dict(parameterisation="per_step", optimiser="coordinate", features="pixels")
    free = fit_guarded(Drifting(), QSchedConfig(**cfg), STEPS, P_FIT, P_HELD, progress=False)
    held = fit_guarded(Drifting(), QSchedConfig(**cfg, anchor_weight=50.0), STEPS, P_FIT, P_HELD, progress=False)
    dist = lambda r: sum(abs(v - 1) for v in r.schedule.c_eps + r.schedule.c_x)  # noqa: E731
    assert dist(held) < dist(free)
    assert held.train_jaq_identity == free.train_jaq_identity  # identity has anchor distance 0
    assert held.train_jaq_best < free.train_jaq_best  # the reported fitting value includes the penalty


def test_trust_region_bounds_coefficients_and_radius_is_chosen_on_validation():
    ev = Drifting()
    cfg = QSchedConfig(parameterisation="per_step", optimiser="coordinate", features="pixels",
                       trust_radius=(0.02, 0.05, 0.2), anchor_weight=1.0)  # fmt: skip
    res = fit_guarded(ev, cfg, STEPS, P_FIT, P_HELD, progress=False)
    rows = res.report["candidates"]
    assert [r["trust_radius"] for r in rows] == [0.02, 0.05, 0.2]
    for r in rows:
        assert all(abs(v - 1) <= r["trust_radius"] + 1e-9 for v in r["c_eps"] + r["c_x"])
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["validation_score"] == max(r["validation_score"] for r in rows)
    assert ev.calls.count("fit") < sum(1 for _ in rows) * 30  # identity drawn once, shared by the radii
    assert res.accepted and f"trust radius {chosen[0]['trust_radius']:g}" in res.message


def test_eval_log_keeps_features_and_replays_them(tmp_path):
    path = tmp_path / "log.jsonl"
    cfg = QSchedConfig(parameterisation="per_step", optimiser="coordinate", features="pixels", guard=True)
    first = fit_guarded(Drifting(), cfg, STEPS, P_FIT, P_HELD, EvalCache(path, {"x": 1}), progress=False)
    ev = Drifting()
    again = fit_guarded(ev, cfg, STEPS, P_FIT, P_HELD, EvalCache(path, {"x": 1}), progress=False)
    assert ev.calls == [] and again.new_generations == 0 and again.message == first.message
    rec = json.loads(path.read_text().splitlines()[1])
    assert len(rec["features"]) == P_FIT and len(rec["features"][0]) == DIM
    cache = EvalCache(path, {"x": 1})
    key = rec["key"]
    assert cache.features(key) == rec["features"] and cache.get(key) == (rec["alignment"], rec["quality"])


def test_missing_features_is_a_clear_error():
    cfg = QSchedConfig(parameterisation="per_step", optimiser="coordinate", features="pixels", guard=True)
    with pytest.raises(QdiffError, match="no image features recorded"):
        fit_guarded(lambda s, split: Drifting()(s, split)[:2], cfg, STEPS, P_FIT, P_HELD, progress=False)


def test_alignment_weight_in_jaq():
    a, q = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert float(jaq(a, q, 2.0, True, 0.0)) == pytest.approx(2.0 * -0.25)
    assert float(jaq(a, q, 0.0, True, 1.0)) == pytest.approx(0.5 * (math.log(2) + math.log(3)))
    assert float(jaq(a, q, 2.0, False, 0.5)) == pytest.approx(0.5 * 2.5 - 0.5)


def test_pixel_statistics_float64_reference():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    f = pixel_statistics(x)
    xd = x.double().numpy()
    pooled = xd.reshape(3, 3, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(3, -1)
    grad = np.abs(np.diff(xd, axis=3)).mean(axis=(2, 3)) + np.abs(np.diff(xd, axis=2)).mean(axis=(2, 3))
    ref = np.concatenate([xd.mean(axis=(2, 3)), xd.std(axis=(2, 3)), pooled, grad], axis=1)
    assert f.dtype == torch.float64 and f.shape == (3, 57)
    np.testing.assert_allclose(f.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_make_features():
    assert make_features("pixels").name == "pixels"
    clip = make_features("shapes-clip")
    f = clip.features(torch.rand(2, 3, 64, 64))
    assert f.shape == (2, 128) and torch.allclose(f.norm(dim=-1), torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert make_features("shapes-classifier").features(torch.rand(2, 3, 64, 64)).shape == (2, 128)
    with pytest.raises(QdiffError, match="unknown feature extractor"):
        make_features("inception")


def test_recipe_round_trip_and_validation():
    data = {"name": "r", "qsched": {"features": "shapes-clip", "anchor_weight": 2.5, "trust_radius": [0.05, 0.1],
                                    "guard": True, "guard_tolerance": 0.1, "alignment_weight": 0.0}}  # fmt: skip
    r = Recipe.from_dict(data)
    assert r.qsched.trust_radius == (0.05, 0.1) and r.qsched.guard and r.qsched.anchor_weight == 2.5
    import yaml

    again = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r and again.to_dict()["qsched"]["trust_radius"] == [0.05, 0.1]
    bad = [
        ({"guard": True}, "anchor_weight > 0 and guard need image features"),
        ({"anchor_weight": 1.0}, "need image features"),
        ({"trust_radius": [0.1, 0.05]}, "increasing"),
        ({"trust_radius": [0.0]}, r"trust_radius\[0\]"),
        ({"anchor_weight": -1.0, "features": "pixels"}, "anchor_weight"),
        ({"guard_tolerance": -0.1}, "guard_tolerance"),
        ({"alignment_weight": float("nan")}, "alignment_weight"),
        ({"features": ""}, "qsched.features"),
    ]
    for change, msg in bad:
        with pytest.raises(QdiffError, match=msg):
            Recipe.from_dict({"name": "r", "qsched": change})
