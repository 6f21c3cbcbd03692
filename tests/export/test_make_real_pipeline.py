"""``scripts/make_real_checkpoint.py --pipeline``: a whole SDXL pipeline folder around a random-weight UNet, with
the tiny SDXL text encoders / VAE sized to drive it (``qdiff.models.tiny.tiny_sdxl_parts_for``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script

from qdiff.errors import QdiffError
from qdiff.export.checkpoint import open_checkpoint
from qdiff.export.resolve import load_pipeline, place
from qdiff.models.published import SDXL_UNET
from qdiff.models.tiny import tiny_sdxl_parts_for, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def script():
    return load_script("make_real_checkpoint")


def test_parts_fit_the_published_sdxl_unet():
    """The encoders' outputs have the widths the real UNet's layers take (read off the UNet built on meta)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
    pipe = tiny_sdxl_parts_for(SDXL_UNET)
    assert pipe.unet is None
    embeds, _, pooled, _ = pipe.encode_prompt("a red car", device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape[-1] == unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.in_features
    time_ids = 6 * unet.add_time_proj.num_channels  # original size, crop corner, target size
    assert pooled.shape[-1] + time_ids == unet.add_embedding.linear_1.in_features
    assert pipe.vae.config.latent_channels == unet.conv_in.in_channels == unet.conv_out.out_channels


def test_parts_refuse_a_unet_they_cannot_drive():
    with pytest.raises(QdiffError, match="no tiny SDXL encoders fit this UNet"):
        tiny_sdxl_parts_for({**SDXL_UNET, "cross_attention_dim": 1280})
    with pytest.raises(QdiffError, match="not an SDXL UNet config"):
        tiny_sdxl_parts_for({"cross_attention_dim": 768})


def test_script_writes_a_float16_pipeline_that_runs(script, tmp_path):
    unet = tiny_sdxl_pipeline(0).unet
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({**unet.config, "_class_name": "UNet2DConditionModel"}))
    out = tmp_path / "pipe"
    assert script.main(["--family", "sdxl", "--config-json", str(config), "--pipeline", "--out", str(out),
                        "--no-progress"]) == 0  # fmt: skip
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]
    weights = sorted(out.glob("*/*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for w in weights:
        with open_checkpoint(w) as reader:
            assert {reader.dtype(k) for k in reader.keys() if reader.dtype(k).is_floating_point} == {torch.float16}

    pipe = load_pipeline(str(out))
    dtype = place(pipe, "cpu")
    gen = torch.Generator("cpu").manual_seed(0)
    images = pipe("a red car", num_inference_steps=1, guidance_scale=0.0, generator=gen, output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and images.dtype == dtype and torch.isfinite(images).all()


def test_script_pipeline_needs_an_sdxl_unet(script, tmp_path):
    with pytest.raises(SystemExit, match="--pipeline needs an SDXL-style UNet"):
        script.main(["--family", "sd15", "--pipeline", "--out", str(tmp_path / "x"), "--no-progress"])
    assert not (tmp_path / "x").exists()
