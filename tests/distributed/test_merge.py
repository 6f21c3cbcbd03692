"""Merging statistics of consecutive shards: LayerStats (capture) exactly as one pass, observers by their rules."""

from __future__ import annotations

import math

import pytest
import torch

from qdiff.calib.sharded import TracedStats, merge_stats
from qdiff.calib.stats import LayerStats
from qdiff.quant.observers import EMAMinMaxObserver, MinMaxObserver, MSEObserver, PercentileObserver


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # scales grow and shrink so the histogram radius widens at different times per shard
        scale = [0.3, 5.0, 1.0, 40.0, 0.01, 2.0][i % 6]
        out.append((torch.randn(3, 50, generator=g) * scale + 0.1 * i, i % 3))
    return out


@pytest.mark.parametrize("cuts", [(4,), (1, 7), (0, 3, 3, 9), (5, 6, 11)])
def test_merged_shards_equal_one_pass(cuts):
    batches = _batches(12)
    whole = LayerStats(64, 0.9)
    for x, step in batches:
        whole.update(x, step)
    bounds = [0, *cuts, len(batches)]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        part = TracedStats(64, 0.9)
        for x, step in batches[a:b]:
            part.update(x, step)
        parts.append(part)
    merged = merge_stats(parts)
    assert merged.step_min == whole.step_min and merged.step_max == whole.step_max
    assert merged.step_count == whole.step_count and merged.num_updates == whole.num_updates
    assert merged.ema == whole.ema  # exact: the same float fold in the same order
    assert merged.radius == whole.radius and torch.equal(merged.hist, whole.hist)
    assert merged.percentile_range(99.0) == whole.percentile_range(99.0)


def test_merge_handles_empty_and_all_zero_shards():
    zeros, data = TracedStats(16), TracedStats(16)
    zeros.update(torch.zeros(10))
    data.update(torch.tensor([0.0, 1.5, -3.0]))
    whole = LayerStats(16)
    whole.update(torch.zeros(10))
    whole.update(torch.tensor([0.0, 1.5, -3.0]))
    merged = merge_stats([TracedStats(16), zeros, TracedStats(16), data])
    assert torch.equal(merged.hist, whole.hist) and merged.ema == whole.ema and merged.minmax() == (-3.0, 1.5)
    assert merge_stats([TracedStats(16)]).num_updates == 0


def _feed(obs, xs):
    for x in xs:
        obs.update(x)
    return obs


def test_observer_merges_follow_their_rules():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 33, generator=g) * (1 + i) for i in range(9)]
    head, tail = xs[:4], xs[4:]
    # min / max: exact
    mm = _feed(MinMaxObserver(), head)
    mm.merge(_feed(MinMaxObserver(), tail))
    ref = _feed(MinMaxObserver(), xs)
    assert torch.equal(mm.range()[0], ref.range()[0]) and torch.equal(mm.range()[1], ref.range()[1])
    # EMA: the order-defined merge equals the sequential EMA over head then tail (float64 reference)
    m = 0.9
    ema = _feed(EMAMinMaxObserver(m), head)
    ema.merge(_feed(EMAMinMaxObserver(m), tail))
    lo = hi = None
    for x in xs:
        a, b = float(x.double().min()), float(x.double().max())
        lo, hi = (a, b) if lo is None else (m * lo + (1 - m) * a, m * hi + (1 - m) * b)
    assert ema.range()[0].item() == pytest.approx(lo, rel=1e-6)
    assert ema.range()[1].item() == pytest.approx(hi, rel=1e-6)
    assert ema._num_updates == 9
    # ... which is not the merge the other way round (order is part of the definition)
    rev = _feed(EMAMinMaxObserver(m), tail)
    rev.merge(_feed(EMAMinMaxObserver(m), head))
    assert not math.isclose(rev.range()[1].item(), hi, rel_tol=1e-3)
    # associativity of the ordered merge (three shards, both groupings)
    a1, b1, c1 = (_feed(EMAMinMaxObserver(m), xs[i:j]) for i, j in ((0, 3), (3, 5), (5, 9)))
    b1.merge(c1)
    a1.merge(b1)
    assert a1.range()[1].item() == pytest.approx(hi, rel=1e-6)
    # percentile: mean of the per-update percentiles over all updates
    pc = _feed(PercentileObserver(90.0), head)
    pc.merge(_feed(PercentileObserver(90.0), tail))
    ref_hi = sum(float(torch.quantile(x.double().flatten(), 0.9)) for x in xs) / len(xs)
    assert pc.range()[1].item() == pytest.approx(ref_hi, rel=1e-5)
    # MSE: exact min / max, a bounded sample with update-count shares of both sides
    a2, b2 = _feed(MSEObserver(sample_size=90), head), _feed(MSEObserver(sample_size=90), tail)
    a_sample, b_sample = a2.sample.clone(), b2.sample.clone()
    a2.merge(b2)
    assert a2.sample.numel() <= 90 and a2._num_updates == 9
    assert torch.equal(a2.range()[0], ref.range()[0]) and torch.equal(a2.range()[1], ref.range()[1])
    assert set(a2.sample.tolist()) <= set(a_sample.tolist()) | set(b_sample.tolist())
    assert a2.sample.numel() == 90 and sum(v in set(a_sample.tolist()) for v in a2.sample.tolist()) == 40
    # merging into an empty observer copies; merging kinds fails
    empty = EMAMinMaxObserver(m)
    empty.merge(_feed(EMAMinMaxObserver(m), head))
    assert torch.equal(empty.range()[0], _feed(EMAMinMaxObserver(m), head).range()[0])
    with pytest.raises(TypeError):
        mm.merge(pc)
