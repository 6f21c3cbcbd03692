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

    monkeypatch.setattr("qdiff.api.draw", lambda p, *a, **k: failing_call())
    with pytest.raises(RuntimeError, match="exploded"):
        qdiff.quantize(pipe, "w8a8-static", progress=False)
    assert seen, "observers were never attached"
    assert all(m.observer is None for m in pipe.unet.modules() if isinstance(m, QuantLayer))


# ---- non-finite input: refused with the parameter / layer and step named, before anything changes ------------------
def _poison_param(module: torch.nn.Module, name: str, value: float, count: int) -> None:
    with torch.no_grad():
        module.get_parameter(name).view(-1)[:count] = value


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal keys and bit-identical values (NaN included: compared as raw bytes)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def test_quantize_refuses_nan_weight_before_modifying_anything():
    pipe = tiny_sd_pipeline(seed=0)
    layer = "down_blocks.0.attentions.0.proj_in"
    assert layer in {i.name for i in get_adapter(pipe.unet).layers(pipe.unet) if not i.protected}  # a selected layer
    _poison_param(pipe.unet, f"{layer}.weight", float("nan"), 3)
    before, scheduler = _snapshot(pipe.unet), type(pipe.scheduler)
    with pytest.raises(QdiffError, match=rf"^denoiser: weight of '{layer}' has 3 NaN values;"):
        qdiff.quantize(pipe, "w8a8-static", progress=False)  # static: would otherwise calibrate first
    assert not quantized_layers(pipe.unet) and type(pipe.scheduler) is scheduler
    assert _same_bits(_snapshot(pipe.unet), before)


def test_quantize_refuses_inf_in_any_float_parameter_and_counts_the_others():
    pipe = tiny_sd_pipeline(seed=0)
    _poison_param(pipe.unet, "down_blocks.0.resnets.0.norm1.bias", float("inf"), 1)  # a norm: never quantized
    _poison_param(pipe.unet, "conv_out.weight", float("-inf"), 2)  # a protected layer
    with pytest.raises(QdiffError) as err:
        qdiff.quantize(pipe, "w8a8", progress=False)
    assert str(err.value).startswith(
        "denoiser: bias of 'down_blocks.0.resnets.0.norm1' has 1 Inf value (and 1 more non-finite parameter(s))"
    )


def test_calibrate_refuses_nan_weight():
    pipe = tiny_sd_pipeline(seed=0)
    _poison_param(pipe.unet, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", float("nan"), 2)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    with pytest.raises(QdiffError, match=f"weight of '{layer}' has 2 NaN values"):
        qdiff.calibrate(pipe, "mixdq-w8a8", progress=False)


def _nan_at_call(den: torch.nn.Module, call: int) -> list[int]:
    """Make the denoiser's ``call``-th call (0-based, over the whole run) see a NaN in its latent input."""
    calls = [0]

    def hook(_module, args, kwargs):
        calls[0] += 1
        if calls[0] - 1 == call:
            sample = (args[0] if args else kwargs["sample"]).clone()
            sample.view(-1)[0] = float("nan")
            return ((sample, *args[1:]), kwargs) if args else (args, {**kwargs, "sample": sample})
        return None

    den.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_static_calibration_names_layer_and_step_of_a_nan_activation():
    """Two prompts, one per pipeline call, two steps each: the 4th denoiser call is step 1 of the second call."""
    import dataclasses

    r = Recipe.load("w8a8-static")
    recipe = r.replace(sampler=dataclasses.replace(r.sampler, steps=2),
                       calibration=dataclasses.replace(r.calibration, batch_size=1))  # fmt: skip
    pipe = tiny_sd_pipeline(seed=0)
    calls = _nan_at_call(pipe.unet, 3)
    pattern = r"^calibration: input of layer '([\w.]+)' at sampling step 1 has \d+ NaN"
    with pytest.raises(QdiffError, match=pattern) as e:
        qdiff.quantize(pipe, recipe, prompts=["a red circle", "a blue square"], progress=False)
    assert calls[0] == 4  # stopped at the poisoned call
    name = str(e.value).split("'")[1]
    assert name in quantized_layers(pipe.unet)
    assert all(m.observer is None for m in quantized_layers(pipe.unet).values())  # observers detached


def test_capture_names_layer_and_step_of_a_nan_activation():
    import dataclasses

    r = Recipe.load("mixdq-w8a8")
    recipe = r.replace(sampler=dataclasses.replace(r.sampler, steps=2),
                       calibration=dataclasses.replace(r.calibration, num_prompts=2, batch_size=2))  # fmt: skip
    pipe = tiny_sd_pipeline(seed=0)
    _nan_at_call(pipe.unet, 1)  # step 1 of the first (and only) pipeline call
    with pytest.raises(QdiffError, match=r"^calibration: input of layer '[\w.]+' at sampling step 1 has \d+ NaN"):
        qdiff.calibrate(pipe, recipe, progress=False)
    assert len(pipe.unet._forward_pre_hooks) == 1  # only the test's own: capture removed its hooks
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules() if m is not pipe.unet)


def test_quantize_rejects_empty_prompt_list():
    with pytest.raises(QdiffError, match="prompts: empty list"):
        qdiff.quantize(tiny_sd_pipeline(seed=0), "w8a8-static", prompts=[], progress=False)
