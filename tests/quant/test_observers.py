"""Tests for qdiff.quant.observers: hand computations, numpy references, state round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qdiff.errors import QdiffError
from qdiff.numerics.primitives import compute_qparams, dequantize, quantize
from qdiff.quant.observers import (
    OBSERVER_NAMES,
    EMAMinMaxObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from qdiff.utils.finite import NonFiniteError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batches(n: int, shape=(4, 8, 6), seed: int = 0) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(*shape, generator=g) * (1 + i) + 0.1 * i for i in range(n)]


def _fq_mse(x: torch.Tensor, scale, zp, bits: int, symmetric: bool) -> float:
    xq = dequantize(quantize(x, scale, zp, bits, symmetric), scale, zp)
    return float((xq.double() - x.double()).square().mean())


# --------------------------------------------------------------------------------------------------------------------
# common behaviour
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_uninitialized_raises(name):
    obs = make_observer(name)
    assert isinstance(obs, Observer) and not obs.initialized
    with pytest.raises(RuntimeError):
        obs.range()
    with pytest.raises(RuntimeError):
        obs.qparams(8, True)
    obs.update(torch.empty(0, 3))  # empty batches carry no information and are ignored
    assert not obs.initialized
    obs.update(torch.randn(3, 3))
    assert obs.initialized


def test_make_observer_names_and_errors():
    assert OBSERVER_NAMES == ("minmax", "ema", "percentile", "mse")
    types = [MinMaxObserver, EMAMinMaxObserver, PercentileObserver, MSEObserver]
    for name, cls in zip(OBSERVER_NAMES, types):
        assert type(make_observer(name)) is cls
    assert make_observer("ema", momentum=0.5).momentum == 0.5
    assert make_observer("percentile", percentile=99.0).percentile == 99.0
    assert make_observer("minmax", axis=1).axis == 1
    with pytest.raises(ValueError) as info:
        make_observer("histogram")
    msg = str(info.value)
    assert "histogram" in msg and all(n in msg for n in OBSERVER_NAMES)
    with pytest.raises(TypeError):
        make_observer("minmax", momentum=0.9)
    with pytest.raises(ValueError):
        make_observer("ema", momentum=1.0)
    with pytest.raises(ValueError):
        make_observer("percentile", percentile=120)


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_bf16_input_range_is_float32(name):
    obs = make_observer(name)
    obs.update(torch.randn(64, generator=_gen(1)).to(torch.bfloat16))
    mn, mx = obs.range()
    assert mn.dtype == mx.dtype == torch.float32 and mn.shape == mx.shape == ()
    scale, zp = obs.qparams(8, False)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32 and scale.shape == ()


# --------------------------------------------------------------------------------------------------------------------
# min-max and EMA
# --------------------------------------------------------------------------------------------------------------------


def test_minmax_per_tensor():
    obs = MinMaxObserver()
    batches = _batches(3)
    for b in batches:
        obs.update(b)
    allv = torch.cat([b.flatten() for b in batches])
    mn, mx = obs.range()
    assert float(mn) == float(allv.min()) and float(mx) == float(allv.max())
    scale, zp = obs.qparams(8, True)
    assert torch.equal(scale, compute_qparams(allv.min(), allv.max(), 8, True)[0])


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_minmax_per_channel(axis):
    obs = MinMaxObserver(axis=axis)
    batches = _batches(3, shape=(4, 5, 6))
    for b in batches:
        obs.update(b)
    stacked = np.concatenate([b.numpy() for b in batches], axis=0)  # concatenating along dim 0 keeps channels
    ax = axis % 3
    other = tuple(i for i in range(3) if i != ax)
    mn, mx = obs.range()
    assert mn.shape == (batches[0].shape[ax],)
    if ax != 0:
        np.testing.assert_array_equal(mn.numpy(), stacked.min(axis=other))
        np.testing.assert_array_equal(mx.numpy(), stacked.max(axis=other))
    else:  # axis 0 channels: each batch has 4 "channels" along dim 0; the running min is elementwise over batches
        per_batch = np.stack([b.numpy().reshape(4, -1).min(1) for b in batches])
        np.testing.assert_array_equal(mn.numpy(), per_batch.min(0))
    scale, zp = obs.qparams(4, False)
    assert scale.shape == zp.shape == mn.shape
    with pytest.raises(ValueError):
        obs.update(torch.randn(7, 7, 7))  # channel count changed


def test_ema_matches_hand_computation():
    m = 0.9
    obs = EMAMinMaxObserver(momentum=m)
    batch_ranges = [(-1.0, 2.0), (-3.0, 1.0), (-0.5, 5.0), (-2.0, 0.5)]
    exp_lo, exp_hi = None, None
    for lo, hi in batch_ranges:
        obs.update(torch.tensor([lo, 0.25 * (lo + hi), hi]))
        if exp_lo is None:
            exp_lo, exp_hi = lo, hi  # first update sets the range
        else:
            exp_lo = m * exp_lo + (1 - m) * lo
            exp_hi = m * exp_hi + (1 - m) * hi
        mn, mx = obs.range()
        assert float(mn) == pytest.approx(exp_lo, rel=1e-6) and float(mx) == pytest.approx(exp_hi, rel=1e-6)
    # final: lo = .9 (.9 (.9 (-1) + .1 (-3)) + .1 (-.5)) + .1 (-2) = .9 (-1.13) - .2 = -1.217
    assert float(obs.range()[0]) == pytest.approx(-1.217, rel=1e-6)


def _ema_closed_form(values: list[float], m: float) -> float:
    """EMA whose first update sets the value, in float64: m^(n-1) v_1 + sum_{i>=2} (1 - m) m^(n-i) v_i."""
    n = len(values)
    return m ** (n - 1) * values[0] + sum((1 - m) * m ** (n - i) * v for i, v in enumerate(values, 1) if i >= 2)


@pytest.mark.parametrize("momentum", [None, 0.0, 0.5, 0.99])
def test_ema_equals_float64_closed_form_over_a_long_sequence(momentum):
    """60 batches with known min / max; ``None``: the default-constructed observer must be MixDQ's m = 0.95."""
    obs = EMAMinMaxObserver() if momentum is None else EMAMinMaxObserver(momentum=momentum)
    m = 0.95 if momentum is None else momentum
    g = _gen(7)
    lows = (-torch.rand(60, generator=g, dtype=torch.float64) * 10).tolist()
    highs = (torch.rand(60, generator=g, dtype=torch.float64) * 10).tolist()
    for lo, hi in zip(lows, highs):
        batch = torch.tensor([lo, 0.5 * (lo + hi), hi], dtype=torch.float64).float()  # exact min / max per batch
        obs.update(batch)
    f32 = [[float(torch.tensor(v).float()) for v in seq] for seq in (lows, highs)]  # what the observer sees
    mn, mx = obs.range()
    # float32 accumulation over 60 steps: a few ulps of the range
    assert float(mn) == pytest.approx(_ema_closed_form(f32[0], m), rel=1e-5, abs=1e-5)
    assert float(mx) == pytest.approx(_ema_closed_form(f32[1], m), rel=1e-5, abs=1e-5)
    other = _ema_closed_form(f32[1], 0.9)
    assert abs(float(mx) - other) > 1e-3  # the momentum matters on this sequence: a wrong one would be caught


def test_ema_per_channel():
    obs = EMAMinMaxObserver(momentum=0.5, axis=-1)
    a = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    b = torch.tensor([[5.0, -6.0], [7.0, 2.0]])
    obs.update(a)
    obs.update(b)
    mn, mx = obs.range()
    assert mn.tolist() == [0.5 * 1 + 0.5 * 5, 0.5 * -2 + 0.5 * -6]
    assert mx.tolist() == [0.5 * 3 + 0.5 * 7, 0.5 * 0 + 0.5 * 2]


# --------------------------------------------------------------------------------------------------------------------
# percentile
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [99.99, 99.0, 90.0, 50.0, 100.0])
def test_percentile_matches_numpy(p):
    x = torch.randn(10007, generator=_gen(3)) ** 3  # heavy-ish tails, odd count so interpolation is exercised
    obs = PercentileObserver(percentile=p)
    obs.update(x.reshape(-1, 1))
    mn, mx = obs.range()
    lo, hi = np.percentile(x.double().numpy(), [100 - p, p])  # numpy default: linear interpolation
    assert float(mn) == pytest.approx(lo, rel=1e-5, abs=1e-6)
    assert float(mx) == pytest.approx(hi, rel=1e-5, abs=1e-6)


def test_percentile_known_sample_and_running_mean():
    obs = PercentileObserver(percentile=99.0)
    # 0..100 -> the 1st / 99th percentiles are exactly 1 and 99
    obs.update(torch.arange(101, dtype=torch.float32)[torch.randperm(101, generator=_gen(0))])
    assert obs.range()[0].item() == 1.0 and obs.range()[1].item() == 99.0
    obs.update(torch.arange(101, dtype=torch.float32) * 3)  # percentiles 3 and 297
    assert obs.range()[0].item() == pytest.approx(2.0) and obs.range()[1].item() == pytest.approx(198.0)


def test_percentile_default_clips_the_outer_hundredth_of_a_percent():
    """Default-constructed: 0..20000 -> the 0.01th / 99.99th percentiles, numpy's linear interpolation (2, 19998);
    min-max would give (0, 20000), a 99.9 percentile (20, 19980)."""
    x = torch.arange(20001, dtype=torch.float32)[torch.randperm(20001, generator=_gen(1))]
    obs = PercentileObserver()
    obs.update(x)
    lo, hi = np.percentile(x.double().numpy(), [0.01, 99.99])
    assert (lo, hi) == pytest.approx((2.0, 19998.0), abs=1e-9)
    assert (obs.range()[0].item(), obs.range()[1].item()) == pytest.approx((lo, hi), abs=1e-6)


def test_percentile_large_input_subsample():
    g = _gen(4)
    x = torch.randn(1, 2049, 640, generator=g)  # 1.31M values > 2**20: strided subsample path
    x[..., 1] = 50.0  # an outlier channel at an odd index (a stride of 2 would skip it entirely)
    obs = PercentileObserver(percentile=100.0)
    obs.update(x)
    assert obs.range()[1].item() == 50.0
    obs99 = PercentileObserver(percentile=99.0)
    y = torch.randn(1100, 1000, generator=g)
    obs99.update(y)
    lo, hi = np.percentile(y.numpy(), [1.0, 99.0])
    assert abs(obs99.range()[0].item() - lo) < 0.02 and abs(obs99.range()[1].item() - hi) < 0.02


# --------------------------------------------------------------------------------------------------------------------
# MSE observer
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_observer_not_worse_than_minmax_heavy_tailed(bits, symmetric):
    g = _gen(bits)
    # Student-t-like heavy tails: normal / sqrt(chi2_2 / 2), plus a few large outliers
    z = torch.randn(20000, generator=g)
    chi = (torch.randn(20000, generator=g) ** 2 + torch.randn(20000, generator=g) ** 2) / 2
    x = (z / chi.sqrt().clamp_min(0.05)).reshape(100, 200) + 0.5
    x.view(-1)[::4999] = 40.0
    mse_obs, mm_obs = MSEObserver(), MinMaxObserver()
    for chunk in x.chunk(2):
        mse_obs.update(chunk)
        mm_obs.update(chunk)
    assert torch.equal(torch.stack(mse_obs.range()), torch.stack(mm_obs.range()))  # also tracks min / max
    s, z = mse_obs.qparams(bits, symmetric)
    s0, z0 = mm_obs.qparams(bits, symmetric)
    e_mse, e_mm = _fq_mse(x, s, z, bits, symmetric), _fq_mse(x, s0, z0, bits, symmetric)
    assert e_mse <= e_mm * (1 + 1e-6)
    if bits == 4:
        assert e_mse < 0.5 * e_mm  # clipping the tails pays off a lot on this data
    assert s.shape == () and z.dtype == torch.int32


def test_mse_observer_grid_one_is_minmax():
    x = torch.randn(500, generator=_gen(5)) ** 3
    obs = MSEObserver(grid=1)
    obs.update(x)
    s, z = obs.qparams(4, False)
    s0, z0 = compute_qparams(x.min(), x.max(), 4, False)
    assert torch.equal(s, s0) and torch.equal(z, z0)


def test_mse_observer_sample_bounded_deterministic_and_fair():
    a, b = MSEObserver(), MSEObserver()
    for i in range(4):
        v = torch.full((50000,), float(i))
        a.update(v)
        b.update(v.clone())
    assert a.sample.numel() <= 65536 and torch.equal(a.sample, b.sample)
    counts = torch.bincount(a.sample.long(), minlength=4).tolist()
    assert all(abs(c - 65536 / 4) < 0.02 * 65536 for c in counts)  # every update has an equal share
    small = MSEObserver(sample_size=100)
    small.update(torch.randn(1000, generator=_gen(0)))
    assert small.sample.numel() <= 100


# --------------------------------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------------------------------


_CONFIGS = [
    ("minmax", {}),
    ("minmax", {"axis": 1}),
    ("ema", {"momentum": 0.8}),
    ("ema", {"axis": -1}),
    ("percentile", {"percentile": 99.0}),
    ("mse", {}),
]


@pytest.mark.parametrize("name,kwargs", _CONFIGS)
def test_state_dict_round_trip_and_resume(name, kwargs):
    batches = _batches(4)
    full = make_observer(name, **kwargs)
    for b in batches:
        full.update(b)

    part = make_observer(name, **kwargs)
    for b in batches[:3]:
        part.update(b)
    state = part.state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))

    # tensors -> JSON -> lists -> a fresh observer
    as_json = json.dumps({k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
    resumed = make_observer(name, **kwargs)
    resumed.load_state_dict(json.loads(as_json))
    for bits, sym in [(8, True), (4, False)]:
        s1, z1 = part.qparams(bits, sym)
        s2, z2 = resumed.qparams(bits, sym)
        assert torch.equal(s1, s2) and torch.equal(z1, z2)

    # resuming calibration gives the same range as an uninterrupted run
    resumed.update(batches[3])
    for t_full, t_res in zip(full.range(), resumed.range()):
        torch.testing.assert_close(t_res, t_full, rtol=1e-6, atol=1e-7)
    assert resumed.state_dict()["num_updates"] == 4


def test_state_dict_empty_and_errors():
    obs = MinMaxObserver()
    assert obs.state_dict() == {"num_updates": 0}
    fresh = MinMaxObserver()
    fresh.load_state_dict({"num_updates": 0})
    assert not fresh.initialized
    with pytest.raises(KeyError):
        fresh.load_state_dict({"min_val": torch.tensor(0.0)})
    with pytest.raises(KeyError):
        MSEObserver().load_state_dict({"num_updates": 1, "min_val": 0.0, "max_val": 1.0})


@CUDA
@pytest.mark.parametrize("name,kwargs", _CONFIGS)
def test_cuda_matches_cpu(name, kwargs):
    batches = _batches(3)
    cpu, gpu = make_observer(name, **kwargs), make_observer(name, **kwargs)
    for b in batches:
        cpu.update(b)
        gpu.update(b.cuda())
    for tc, tg in zip(cpu.range(), gpu.range()):
        torch.testing.assert_close(tg.cpu(), tc)
    state = gpu.state_dict()
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))


# --------------------------------------------------------------------------------------------------------------------
# non-finite input: refused, never a NaN scale
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name,kwargs", [("minmax", {}), ("minmax", {"axis": 1}), ("ema", {}), ("percentile", {}),
                                         ("mse", {})])  # fmt: skip
def test_observer_refuses_non_finite_input_and_keeps_its_state(name, kwargs, bad):
    obs = make_observer(name, **kwargs)
    good = torch.randn(4, 6, generator=_gen(5))
    obs.update(good)
    before = obs.state_dict()
    x = torch.randn(4, 6, generator=_gen(6))
    x[2, 3] = bad
    x[1, 1] = bad
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(NonFiniteError, match=f"^2 {kind} values$"):
        obs.update(x)
    after = obs.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(torch.as_tensor(after[k]), torch.as_tensor(before[k])) for k in before)
    scale, _ = obs.qparams(8, False)
    assert bool(torch.isfinite(scale).all())
    assert issubclass(NonFiniteError, QdiffError)  # the CLI shows it as one line
