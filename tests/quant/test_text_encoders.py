"""Text-encoder quantization (recipe ``text_encoders``): CLIP W8A8 BOS-aware, bitsandbytes T5, export round trips."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

import qdiff
from qdiff.config.recipe import Recipe, TextEncoderConfig
from qdiff.errors import QdiffError
from qdiff.export.resolve import load_pipeline
from qdiff.quant.bos import BOSQuantLinear
from qdiff.quant.text_encoders import clip_layers, quantize_clip_w8a8, quantize_text_encoders
from qdiff.quant.transform import quantized_layers


def _recipe(**te) -> Recipe:
    recipe = Recipe.load("w8a8")
    sampler = dataclasses.replace(recipe.sampler, steps=1, height=32, width=32)
    return recipe.replace(sampler=sampler, text_encoders=TextEncoderConfig(**te))


def _images(pipe):
    gen = torch.Generator("cpu").manual_seed(3)
    return pipe(["a red cat on a house", "a dog"], num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
                generator=gen, output_type="pt").images  # fmt: skip


def _encode(pipe, prompts, attr="text_encoder"):
    tok = getattr(pipe, attr.replace("text_encoder", "tokenizer"))
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return getattr(pipe, attr)(ids.input_ids)[0]


def test_clip_w8a8_bos_row_exact_and_rest_quantized():
    pipe = load_pipeline("builtin:tiny-sd")
    prompts = ["a photo of a red cat", "a small house in the snow at night"]
    ref = _encode(pipe, prompts)
    names = clip_layers(pipe.text_encoder)
    assert len(names) == 2 * 6  # 2 layers x (q, k, v, out_proj, fc1, fc2)
    assert quantize_clip_w8a8(pipe.text_encoder, pipe.tokenizer) == "cached"  # causal: token 0 is prompt-free
    for name in names:
        layer = pipe.text_encoder.get_submodule(name)
        assert isinstance(layer, BOSQuantLinear) and layer.state == "frozen" and layer.bos_mode == "cached"
        assert layer.qcfg.w_bits == 8 and layer.qcfg.a_bits == 8 and layer.qcfg.a_mode == "dynamic"
    got = _encode(pipe, prompts)
    # token 0 never meets a quantizer: its whole path is float (cached rows computed in float64, stored fp32)
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=1e-5, atol=1e-5)
    rel = (got[:, 1:] - ref[:, 1:]).norm() / ref[:, 1:].norm()
    assert 1e-5 < rel < 0.05, float(rel)  # the other tokens went through W8A8: changed, but only a little


def test_t5_is_left_alone_by_clip_mode_and_clip_by_t5_mode():
    pipe = load_pipeline("builtin:tiny-pixart")
    assert quantize_text_encoders(pipe, TextEncoderConfig(clip="w8a8")) == {}  # PixArt has only T5


def test_export_round_trip_with_quantized_clip_encoders(tmp_path):
    pipe = qdiff.quantize(load_pipeline("builtin:tiny-sdxl-turbo"), _recipe(clip="w8a8"), progress=False)
    out = qdiff.save(pipe, tmp_path / "export")
    manifest = json.loads((out / "qdiff.json").read_text())
    assert set(manifest["text_encoders"]) == {"text_encoder", "text_encoder_2"}
    assert {p.name for p in (out / "text_encoder").iterdir()} == {"config.json", "qdiff.safetensors"}
    loaded = qdiff.load(out)
    restored = quantized_layers(loaded.text_encoder_2)
    assert set(restored) == set(quantized_layers(pipe.text_encoder_2)) and len(restored) == 12
    assert all(isinstance(m, BOSQuantLinear) and m.bos_mode == "cached" for m in restored.values())
    assert torch.equal(_images(loaded), _images(pipe))
    # the manifest decides what is rebuilt: an unknown mode is refused with one line
    manifest["text_encoders"]["text_encoder"]["mode"] = "pickle"
    (out / "qdiff.json").write_text(json.dumps(manifest))
    with pytest.raises(QdiffError, match=r"text_encoders.text_encoder: unsupported mode/class 'pickle'"):
        qdiff.load(out)


@pytest.mark.parametrize("mode, cls", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_t5_bitsandbytes_round_trip(mode, cls, tmp_path):
    pytest.importorskip("bitsandbytes")
    pipe = load_pipeline("builtin:tiny-flux-schnell")
    ref = _encode(pipe, ["a red cat"], "text_encoder_2")
    pipe = qdiff.quantize(pipe, _recipe(t5=mode), progress=False)
    assert type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q).__name__ == cls
    got = _encode(pipe, ["a red cat"], "text_encoder_2")
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < (0.5 if mode == "nf4" else 0.1), rel  # weight-only 4/8-bit: changed, still close
    out = qdiff.save(pipe, tmp_path / "export")
    assert json.loads((out / "qdiff.json").read_text())["text_encoders"] == {
        "text_encoder_2": {"class": "T5EncoderModel", "mode": mode}
    }
    loaded = qdiff.load(out)
    assert type(loaded.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q).__name__ == cls
    assert torch.equal(_images(loaded), _images(pipe))


def test_missing_bitsandbytes_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    pipe = load_pipeline("builtin:tiny-flux-schnell")
    with pytest.raises(QdiffError, match=r"text_encoders.t5: nf4 needs bitsandbytes.*pip install 'qdiff\[bnb\]'"):
        quantize_text_encoders(pipe, TextEncoderConfig(t5="nf4"))


def test_recipe_section_validates():
    with pytest.raises(QdiffError, match="text_encoders.t5: got 'fp4'"):
        Recipe.from_dict({"text_encoders": {"t5": "fp4"}})
    with pytest.raises(QdiffError, match="text_encoders.clip: got 'w4a8'"):
        Recipe.from_dict({"text_encoders": {"clip": "w4a8"}})
