"""``qdiff eval --peers openvino-fp32,openvino-nncf-int8``: the CPU engine beside qdiff on the same prompts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from qdiff.config.recipe import Recipe  # noqa: E402
from qdiff.eval.peers import PEERS  # noqa: E402
from qdiff.export.resolve import load_pipeline  # noqa: E402


def _images(pipe) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(["a red circle", "a cat"], generator=gens, num_inference_steps=2, guidance_scale=1.0,
                output_type="pt").images  # fmt: skip


def test_openvino_fp32_draws_the_float_models_images():
    from qdiff.calib.metrics import ssim

    pipe, note = PEERS["openvino-fp32"].build(lambda: load_pipeline("builtin:tiny-sd"), Recipe.load("w8a8"), [])
    assert "float parts f32" in note and pipe.unet.engine == "openvino"
    ref = _images(load_pipeline("builtin:tiny-sd"))
    assert float(ssim(_images(pipe), ref).min()) > 0.9999


def test_openvino_nncf_int8_calibrates_on_the_recipes_prompts_and_runs():
    from qdiff.eval.peers_openvino import unet_calibration_inputs

    recipe = Recipe.load("w8a8-static")
    calls = unet_calibration_inputs(load_pipeline("builtin:tiny-sd"), recipe)
    cal = recipe.calibration
    assert len(calls) == -(-cal.num_prompts // cal.batch_size) * recipe.sampler.steps  # every step of every batch
    assert {"sample", "timestep", "encoder_hidden_states"} <= set(calls[0])
    assert calls[0]["timestep"].shape == (calls[0]["sample"].shape[0],)
    pipe, note = PEERS["openvino-nncf-int8"].build(lambda: load_pipeline("builtin:tiny-sd"), recipe, [])
    assert f"calibrated on {len(calls)} UNet calls" in note
    fq = [op for op in pipe.unet.ov.compiled.get_runtime_model().get_ops()
          if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "Convolution")
          and op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8")]  # fmt: skip
    assert fq, "NNCF left no int8 MatMul / convolution"
    images = _images(pipe)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
