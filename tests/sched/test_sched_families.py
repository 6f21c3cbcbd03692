"""Prompt families (issue 25): caption labels against the grammar that wrote them, the stratified split, k-means,
the paired bootstrap against a float64 scipy/numpy reference, and the recipe keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdiff.config.recipe import QSchedConfig, Recipe
from qdiff.errors import QdiffError
from qdiff.models.shapes import data
from qdiff.sched.bootstrap import (
    batched_frechet,
    bootstrap_indices,
    paired_fd_difference,
    paired_mean_difference,
)
from qdiff.sched.families import family_index, kmeans, label_table, shapes_labels, stratified_split


def test_shapes_labels_match_the_grammar_that_wrote_the_caption():
    rng = np.random.default_rng(0)
    templates = data.TRAIN_TEMPLATES + data.HELDOUT_TEMPLATES
    for _ in range(400):
        a, t = data.sample_attributes(rng, "all"), int(rng.integers(len(templates)))
        text = data.caption(a, rng, (templates[t],))
        want = {**a.names(), "template": f"t{t}"}
        if "{background}" not in templates[t]:
            want["background"] = "none"
        assert shapes_labels(text) == want, text
    assert shapes_labels("a photo of a cat") is None
    with pytest.raises(QdiffError, match="not a Shapes caption"):
        label_table(["a red circle on the left", "a cat"], ["colour"])
    with pytest.raises(QdiffError, match="unknown attribute 'mood'"):
        label_table(["a red circle"], ["mood"])


def _pool(n: int, seed: int = 1) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)  # three attributes with skewed, independent weights
    bg = rng.choice(["black", "white", "gray"], size=n, p=[0.5, 0.3, 0.2])
    tp = rng.choice(["t0", "t1", "t2", "t3"], size=n, p=[0.4, 0.3, 0.2, 0.1])
    col = rng.choice(["red", "blue", "green", "pink", "cyan"], size=n, p=[0.1, 0.2, 0.3, 0.25, 0.15])
    return [{"background": str(b), "template": str(t), "colour": str(c)} for b, t, c in zip(bg, tp, col)]


BY = ["background", "template", "colour"]


def _worst(labels, parts, sizes) -> float:
    """Largest |count - proportional share| of any family in any part."""
    fams = family_index(labels, BY).values()
    return max(abs(len(set(f) & set(p)) - len(f) / len(labels) * n) for p, n in zip(parts, sizes) for f in fams)


def test_stratified_split_is_proportional_disjoint_and_deterministic():
    labels, sizes = _pool(300), (40, 90)
    fit, val = stratified_split(labels, BY, sizes, seed=3)
    assert (len(fit), len(val)) == sizes and not set(fit) & set(val)
    assert stratified_split(labels, BY, sizes, seed=3) == [fit, val]
    assert stratified_split(labels, BY, sizes, seed=4) != [fit, val]
    assert _worst(labels, [fit, val], sizes) < 2  # every family of every attribute, in both splits
    with pytest.raises(QdiffError, match="need 301 prompts"):
        stratified_split(labels, BY, (300, 1))


def test_random_split_would_not_be_proportional():  # the property above is not vacuous
    labels = _pool(300)
    perms = [np.random.default_rng(s).permutation(300).tolist() for s in range(20)]
    assert max(_worst(labels, [p[:40], p[40:130]], (40, 90)) for p in perms) >= 4


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 6)) * 10
    truth = rng.integers(3, size=90)
    x = centres[truth] + rng.standard_normal((90, 6))
    got = kmeans(x, 3, seed=1)
    assert len(set(zip(truth.tolist(), got.tolist()))) == 3  # the same partition, up to names
    assert got[0] == 0 and set(got.tolist()) == {0, 1, 2}
    rows = label_table([f"p{i}" for i in range(90)], ["embedding"], x, clusters=3)
    assert [r["embedding"] for r in rows] == [f"c{g}" for g in got]
    with pytest.raises(QdiffError, match="no text embeddings"):
        label_table(["a"], ["embedding"])


# ---- paired bootstrap ----------------------------------------------------------------------------------------
def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _grid(p: int, s: int):
    return [i for _ in range(s) for i in range(p)], [j for j in range(s) for _ in range(p)]


def test_bootstrap_indices_resample_prompts_and_seeds_as_a_grid():
    p_ids, s_ids = _grid(5, 3)
    idx = bootstrap_indices(p_ids, s_ids, 200, seed=7)
    rng = np.random.default_rng(7)  # the documented draw: prompts, then slots, with replacement
    rows, cols = rng.integers(5, size=(200, 5)), rng.integers(3, size=(200, 3))
    for k in range(200):
        want = sorted(c * 5 + r for r in rows[k] for c in cols[k])  # image j * P + i
        assert sorted(idx[k].tolist()) == want
    with pytest.raises(QdiffError, match="full prompts x seeds grid"):
        bootstrap_indices([0, 0, 1], [0, 1, 0], 10)


def test_batched_frechet_matches_scipy_float64():
    rng = np.random.default_rng(2)
    for m, n, d in ((30, 25, 6), (8, 9, 20), (60, 60, 3)):  # full rank and rank-deficient covariances
        a, b = rng.standard_normal((2, m, d)), rng.standard_normal((2, n, d)) * 0.6 + 0.4
        got = batched_frechet(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        want = [scipy_frechet(a[k], b[k]) for k in range(2)]
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


def test_paired_fd_difference_against_a_float64_reference():
    rng = np.random.default_rng(3)
    p_ids, s_ids = _grid(12, 2)
    y = rng.standard_normal((24, 4))
    x = y + 0.3 * rng.standard_normal((24, 4)) + 0.2  # the "schedule": paired with y, shifted
    ref = rng.standard_normal((24, 4))
    got = paired_fd_difference(x, y, ref, p_ids, s_ids, n_boot=300, seed=5, level=0.9)
    idx = bootstrap_indices(p_ids, s_ids, 300, seed=5)
    samples = [scipy_frechet(x[i], ref[i]) - scipy_frechet(y[i], ref[i]) for i in idx]
    lo, hi = np.quantile(samples, [0.05, 0.95])
    assert got.value == pytest.approx(scipy_frechet(x, ref) - scipy_frechet(y, ref), rel=1e-7)
    assert (got.low, got.high, got.level) == (pytest.approx(lo, rel=1e-7), pytest.approx(hi, rel=1e-7), 0.9)
    same = paired_fd_difference(y, y, ref, p_ids, s_ids, n_boot=50)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)  # paired: no difference, no spread


def test_paired_mean_difference_against_numpy():
    rng = np.random.default_rng(4)
    p_ids, s_ids = _grid(10, 3)
    a, b = rng.standard_normal(30) + 0.5, rng.standard_normal(30)
    got = paired_mean_difference(a, b, p_ids, s_ids, n_boot=400, seed=1)
    idx = bootstrap_indices(p_ids, s_ids, 400, seed=1)
    lo, hi = np.quantile([(a[i] - b[i]).mean() for i in idx], [0.025, 0.975])
    assert got.value == pytest.approx((a - b).mean()) and (got.low, got.high) == (pytest.approx(lo), pytest.approx(hi))
    with pytest.raises(QdiffError, match="values for 30 images"):
        paired_mean_difference(a[:5], b[:5], p_ids, s_ids)


# ---- recipe keys -----------------------------------------------------------------------------------------------
def test_recipe_family_keys_round_trip_and_validate(tmp_path):
    cfg = {"features": "pixels", "guard": True, "families": ["template", "background"], "validation_seeds": 2,
           "shrinkage": [0.0, 4.0], "cv_folds": 2, "confidence": 0.9, "bootstrap": 200, "family_tolerance": 0.1,
           "reference_steps": 8}  # fmt: skip
    r = Recipe.from_dict({"name": "x", "qsched": cfg})
    assert r.qsched.families == ("template", "background") and r.qsched.shrinkage == (0.0, 4.0)
    r.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == r and Recipe.from_dict(r.to_dict()) == r
    bad = [({"families": ["mood"]}, "families\\[0\\]"), ({"families": ["shape", "shape"]}, "distinct"),
           ({"features": "none", "guard": False}, "families need image features"),
           ({"shrinkage": [4.0, 1.0]}, "increasing"), ({"families": [], "shrinkage": [1.0]}, "set families"),
           ({"confidence": 1.0}, "confidence"), ({"validation_seeds": 0}, "validation_seeds"),
           ({"bootstrap": 2.5}, "integer"), ({"trust_radius": [0.1, 0.2]}, "one radius at most"),
           ({"reference_steps": 0}, "reference_steps")]  # fmt: skip
    for change, match in bad:
        with pytest.raises(QdiffError, match=match):
            QSchedConfig(**{**cfg, **change, "families": tuple(change.get("families", cfg["families"])),
                            "shrinkage": tuple(change.get("shrinkage", cfg["shrinkage"])),
                            "trust_radius": tuple(change.get("trust_radius", ()))})  # fmt: skip


def test_shapes_pool_is_regenerable_and_disjoint_from_evaluation():
    from qdiff.sampling.prompts import load_prompts

    pool = load_prompts("shapes-pool")
    assert pool == data.calibration_prompts(512, seed=2026) and pool[:64] == load_prompts("shapes")
    assert not set(pool) & set(load_prompts("shapes-heldout"))
    assert {shapes_labels(p)["template"] for p in pool} == {f"t{i}" for i in range(6)}  # training templates only
