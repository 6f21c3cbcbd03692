"""Public API on the tiny pipelines: quantize in place, image fidelity vs FP, plans, calibration hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import generate

import qdiff
from qdiff.calib.metrics import ssim
from qdiff.config.plan import LayerBits, Plan
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.models.adapters import get_adapter
from qdiff.models.tiny import tiny_pixart_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from qdiff.quant.modules import QuantLayer
from qdiff.quant.transform import quantized_layers

# Measured on the tiny random-weight SD pipeline (seed 0, 2 LCM steps): W8A8 SSIM ~0.9999, W4A8 ~0.997.
# Thresholds leave margin for platform float differences while still failing on a broken quantizer
# (a wrong scale or an unpacking bug drops SSIM far below 0.9).
SSIM_MIN = {"w8a8": 0.995, "w8a8-static": 0.99, "w4a8": 0.95}


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-static", "w4a8"])
def test_quantized_sd_images_close_to_fp(recipe):
    pipe = tiny_sd_pipeline(seed=0)
    fp = generate(pipe)
    same = qdiff.quantize(pipe, recipe, progress=False)
    assert same is pipe and type(pipe).__name__ == "StableDiffusionPipeline"
    q = generate(pipe)
    score = float(ssim(fp, q).min())
    assert score >= SSIM_MIN[recipe], score
    assert not torch.equal(fp, q), "quantization changed nothing: layers were not swapped"
    layers = quantized_layers(pipe.unet)
    protected = {i.name for i in get_adapter(pipe.unet).layers(pipe.unet) if i.protected}
    assert layers and not (protected & set(layers))
    assert all(m.state == "frozen" and m.weight is None for m in layers.values())


@pytest.mark.parametrize("builder", [tiny_sdxl_pipeline, tiny_pixart_pipeline], ids=["sdxl", "pixart"])
def test_other_families_quantize_and_run(builder):
    pipe = builder(seed=0)
    fp = generate(pipe, guidance_scale=0.0 if builder is tiny_sdxl_pipeline else 1.0)
    qdiff.quantize(pipe, "w8a8", progress=False)
    q = generate(pipe, guidance_scale=0.0 if builder is tiny_sdxl_pipeline else 1.0)
    assert q.shape == fp.shape and torch.isfinite(q).all()
    assert float(ssim(fp, q).min()) >= 0.98


def test_pipeline_call_signature_unchanged():
    pipe = qdiff.quantize(tiny_sd_pipeline(seed=0), "w8a8", progress=False)
    images = pipe("a blue square", num_inference_steps=2, guidance_scale=1.5).images
    assert images[0].size == (64, 64)


def test_plan_sets_bits_per_layer(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    infos = get_adapter(pipe.unet).layers(pipe.unet)
    names = [i.name for i in infos if not i.protected]
    plan = Plan({names[0]: LayerBits(4, 8), names[1]: LayerBits(8, None), names[2]: LayerBits(None, None)})
    plan.save(tmp_path / "plan.json")
    qdiff.quantize(pipe, Plan.load(tmp_path / "plan.json"), progress=False)
    layers = quantized_layers(pipe.unet)
    assert set(layers) == {names[0], names[1]}
    assert layers[names[0]].qcfg.tag() == "W4A8" and layers[names[1]].qcfg.tag() == "W8A16"


def test_plan_with_unknown_layer():
    with pytest.raises(QdiffError, match="plan names 1 layer"):
        qdiff.quantize(tiny_sd_pipeline(seed=0), Plan({"no.such.layer": LayerBits(8, 8)}), progress=False)


def test_double_quantize_refused():
    pipe = qdiff.quantize(tiny_sd_pipeline(seed=0), "w8a8", progress=False)
    with pytest.raises(QdiffError, match="already quantized"):
        qdiff.quantize(pipe, "w8a8", progress=False)


def test_skip_patterns_and_protected():
    pipe = tiny_sd_pipeline(seed=0)
    recipe = Recipe.load("w8a8").replace(skip=("*attn2*",), quantize_protected=True)
    qdiff.quantize(pipe, recipe, progress=False)
    names = set(quantized_layers(pipe.unet))
    assert "conv_in" in names and "conv_out" in names
    assert not any("attn2" in n for n in names)


def test_observers_removed_after_sampler_error(monkeypatch):
    """Static calibration must detach its observers even when the sampler raises."""
    pipe = tiny_sd_pipeline(seed=0)
    seen = []

    def failing_call(*args, **kwargs):
        seen.extend(m for m in pipe.unet.modules() if isinstance(m, QuantLayer) and m.observer is not None)
        raise RuntimeError("sampler exploded")

    import qdiff.calib.capture as capture

    monkeypatch.setattr(capture, "run_sampler", lambda p, *a, **k: failing_call())
    monkeypatch.setattr("qdiff.api.run_sampler", lambda p, *a, **k: failing_call())
    with pytest.raises(RuntimeError, match="exploded"):
        qdiff.quantize(pipe, "w8a8-static", progress=False)
    assert seen, "observers were never attached"
    assert all(m.observer is None for m in pipe.unet.modules() if isinstance(m, QuantLayer))
