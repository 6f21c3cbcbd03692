"""Runtime LoRAs on quantized tiny pipelines of every architecture diffusers loads LoRAs for, against diffusers' own
float pipeline + the same LoRA; text encoders quantized by qdiff (W8A8 CLIP) with a kohya-format LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qdiff
from qdiff.config.recipe import Recipe, TextEncoderConfig
from qdiff.export.resolve import load_pipeline
from qdiff.lora import load_saved_loras
from qdiff.models.adapters import find_denoiser
from qdiff.models.tiny_loras import write_tiny_lora
from qdiff.quant.transform import quantized_layers
from qdiff.sampling.draw import draw

PROMPTS = ["a red cat on a house", "a blue car"]


def _images(pipe, recipe: Recipe) -> torch.Tensor:
    return draw(pipe, PROMPTS, [3, 4], recipe.sampler, 2)


def _recipe(builtin: str, text_encoders: TextEncoderConfig | None = None) -> Recipe:
    recipe = Recipe.load("w8a8")
    size = 32 if "flux" in builtin else 64
    sampler = dataclasses.replace(recipe.sampler, steps=2, height=size, width=size)
    return recipe.replace(sampler=sampler, text_encoders=text_encoders or TextEncoderConfig())


def _check_close(builtin, fp, q, recipe, load) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the LoRA into both; quantized + LoRA is as far from float + LoRA as quantized is from float, and the
    LoRA's own effect is far larger. Returns the quantized pipeline's (base, with LoRA) images."""
    base_fp, base_q = _images(fp, recipe), _images(q, recipe)
    load(fp)
    load(q)
    lora_fp, lora_q = _images(fp, recipe), _images(q, recipe)
    effect = (lora_fp - base_fp).abs().mean()
    err, err_base = (lora_q - lora_fp).abs().mean(), (base_q - base_fp).abs().mean()
    assert effect > 20 * err, (builtin, effect, err)
    assert err < 3 * err_base + 1e-4, (builtin, err, err_base)
    return base_q, lora_q


@pytest.mark.parametrize("builtin", ["tiny-sdxl", "tiny-flux-schnell", "tiny-sd3"])
def test_denoiser_lora_matches_float_and_unloads_bit_identical(builtin, tmp_path):
    recipe = _recipe(builtin)
    fp = load_pipeline(f"builtin:{builtin}")
    path = write_tiny_lora(fp, tmp_path / "tiny.safetensors", seed=1)
    q = qdiff.quantize(load_pipeline(f"builtin:{builtin}"), recipe, progress=False)
    den = find_denoiser(q)[1]
    frozen = set(quantized_layers(den))

    def load(pipe):
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="tiny")

    base_q, _ = _check_close(builtin, fp, q, recipe, load)
    wrapped = {n for n, m in den.named_modules() if type(m).__name__.startswith("QuantLora")}
    assert wrapped == frozen  # every quantized layer got the branch; the float-kept ones PEFT's own layers
    q.unload_lora_weights()
    assert set(quantized_layers(den)) == frozen
    assert torch.equal(_images(q, recipe), base_q)


def test_quantized_clip_text_encoder_with_a_kohya_lora(tmp_path):
    """SD1.x with qdiff's W8A8 CLIP: a kohya LoRA on the UNet and the text encoder (diffusers converts it)."""
    recipe = _recipe("tiny-sd", TextEncoderConfig(clip="w8a8"))
    fp = load_pipeline("builtin:tiny-sd")
    path = write_tiny_lora(fp, tmp_path / "kohya.safetensors", components=("unet", "text_encoder"), kohya=True)
    q = qdiff.quantize(load_pipeline("builtin:tiny-sd"), recipe, progress=False)

    def load(pipe):
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="k")

    base_q, lora_q = _check_close("tiny-sd", fp, q, recipe, load)
    te = q.text_encoder
    wrapped = [n for n, m in te.named_modules() if type(m).__name__ == "QuantLoraLinear"]
    assert len(wrapped) == len(quantized_layers(te)) > 0  # every W8A8 CLIP layer (BOS-aware ones included)
    q.set_adapters(["k"], adapter_weights=[{"unet": 0.7, "text_encoder": 0.3}])
    weighted = _images(q, recipe)
    out = qdiff.save(q, tmp_path / "export")  # with an unfused LoRA: the export without it, the adapter beside it
    loaded = qdiff.load(out)
    assert torch.equal(_images(loaded, recipe), base_q)
    assert load_saved_loras(loaded, out) == ["k"]
    assert torch.equal(_images(loaded, recipe), weighted)
    q.set_adapters(["k"], adapter_weights=[1.0])
    assert torch.equal(_images(q, recipe), lora_q)
    q.unload_lora_weights()
    assert torch.equal(_images(q, recipe), base_q)
