"""Capture: per-step statistics against float64 references, bounded memory, save/load, hooks removed on error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qdiff.calib.capture import capture_stats, capturing
from qdiff.calib.stats import CapturedStats, LayerStats
from qdiff.config.recipe import Recipe
from qdiff.models.adapters import get_adapter
from qdiff.models.tiny import tiny_sd_pipeline
from qdiff.sampling.draw import draw


def _small_recipe(**changes) -> Recipe:
    r = Recipe.load("w8a8-static")
    return r.replace(
        sampler=dataclasses.replace(r.sampler, steps=2),
        calibration=dataclasses.replace(r.calibration, num_prompts=2, batch_size=2),
        **changes,
    )


def test_per_step_minmax_ema_and_histogram_counts(gen):
    st = LayerStats(bins=64, momentum=0.9)
    batches = [(torch.randn(3, 50, generator=gen) * s, step) for s, step in [(1, 0), (4, 1), (0.5, 0), (20, 1)]]
    for x, step in batches:
        st.update(x, step)
    for step in (0, 1):
        xs = torch.cat([x.reshape(-1) for x, s in batches if s == step]).double()
        assert st.step_min[step] == pytest.approx(float(xs.min())) and st.step_max[step] == pytest.approx(
            float(xs.max())
        )
        assert int(st.hist[step].sum()) == xs.numel() == st.step_count[step]
    ema_lo, ema_hi = float(batches[0][0].min()), float(batches[0][0].max())
    for x, _ in batches[1:]:
        ema_lo, ema_hi = 0.9 * ema_lo + 0.1 * float(x.min()), 0.9 * ema_hi + 0.1 * float(x.max())
    assert st.range("ema") == pytest.approx((ema_lo, ema_hi))
    # after the widenings every value must still sit in its own bin: recount from scratch in float64
    allx = torch.cat([x.reshape(-1) for x, _ in batches]).double()
    r = st.radius
    assert r >= float(allx.abs().max()) and r == 2.0 ** round(torch.log2(torch.tensor(r)).item())
    width = 2 * r / 64
    ref = torch.zeros(64, dtype=torch.int64)
    for v in allx.tolist():
        ref[min(63, int((v + r) // width))] += 1
    assert torch.equal(st.pooled_hist(), ref)


def test_percentile_from_histogram_close_to_exact(gen):
    st = LayerStats(bins=4096)
    x = torch.randn(200_000, generator=gen)
    x[:20] *= 30  # a few outliers: the 99.9th percentile must ignore them
    st.update(x, 0)
    lo, hi = st.percentile_range(99.9)
    ref_lo, ref_hi = torch.quantile(x.double()[::2], torch.tensor([0.001, 0.999], dtype=torch.float64)).tolist()
    bin_w = 2 * st.radius / st.bins
    assert abs(lo - ref_lo) < 2 * bin_w + 0.02 and abs(hi - ref_hi) < 2 * bin_w + 0.02
    assert st.range("minmax") == pytest.approx((float(x.min()), float(x.max())))
    mlo, mhi = st.range("mse", bits=8)
    assert float(x.min()) <= mlo < 0 < mhi <= float(x.max())  # clipped, never widened


def test_memory_is_bounded_by_steps_and_bins(gen):
    st = LayerStats(bins=128)
    for i in range(200):
        st.update(torch.randn(1000, generator=gen) * (1 + i), i % 4)
    assert st.hist.shape == (4, 128) and len(st.step_min) == 4


def test_capture_on_pipeline_save_load_round_trip(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    recipe = _small_recipe(bos_aware=True)
    stats = capture_stats(pipe, recipe, progress=False)
    den = pipe.unet
    kv = get_adapter(den).cross_attention_kv(den)
    assert set(stats.meta["bos_layers"]) == set(kv) and kv
    some = stats.layers["conv_in"]
    assert some.steps == 2 and all(c > 0 for c in some.step_count)  # 2 sampling steps seen separately
    # BOS-aware capture leaves token 0 out: the to_k input has T-1 tokens per sample
    t = pipe.tokenizer.model_max_length
    assert stats.layers[kv[0]].numel_per_sample == (t - 1) * den.get_submodule(kv[0]).in_features
    stats.save(tmp_path)
    back = CapturedStats.load(tmp_path)
    assert back.meta == stats.meta and set(back.layers) == set(stats.layers)
    for name, st in stats.layers.items():
        b = back.layers[name]
        assert torch.equal(b.hist, st.hist) and b.step_min == st.step_min and b.ema == st.ema
        assert b.range("percentile", percentile=99.0) == st.range("percentile", percentile=99.0)


def test_hooks_removed_after_exception():
    pipe = tiny_sd_pipeline(seed=0)
    den = pipe.unet
    layers = {n: den.get_submodule(n) for n in ["conv_in", "down_blocks.0.attentions.0.proj_in"]}
    with pytest.raises(RuntimeError, match="boom"):
        with capturing(den, layers, cache_inputs=list(layers), cache_denoiser=True) as cap:
            draw(pipe, ["a cat"], None, _small_recipe().sampler, 1, output_type="latent", on_batch=cap.new_call)
            assert cap.inputs and cap.denoiser_calls
            raise RuntimeError("boom")
    for m in [den, *layers.values()]:
        assert not m._forward_pre_hooks and not m._forward_hooks


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_is_refused_and_records_nothing(gen, bad):
    from qdiff.utils.finite import NonFiniteError

    st = LayerStats(bins=64)
    st.update(torch.randn(2, 8, generator=gen), step=0)
    before = (st.step_min[:], st.step_max[:], st.step_count[:], st.hist.clone(), st.radius, st.ema, st.num_updates)
    x = torch.randn(2, 8, generator=gen).half()
    x[1, 2] = bad
    with pytest.raises(NonFiniteError, match=f"1 {'NaN' if bad != bad else 'Inf'} value"):
        st.update(x, step=1)
    after = (st.step_min, st.step_max, st.step_count, st.hist, st.radius, st.ema, st.num_updates)
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, after))
