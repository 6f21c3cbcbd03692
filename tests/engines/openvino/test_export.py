"""``qdiff export-openvino``: the folder optimum-intel's contract asks for, qdiff's own loader running it, the CLI.

Tolerance (docs/openvino.md): images of an export run on OpenVINO vs the same export run by qdiff's torch backends,
same prompts and seeds. Tiny pipelines (random weights, 2 steps): SSIM >= 0.999 (measured 0.9997-0.9998); the
Shapes model's numbers are in the docs (W8A8-static 0.989, W4A8-static 0.968, from quantization-boundary flips).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qdiff
from qdiff.errors import QdiffError

ov = pytest.importorskip("openvino")

from qdiff.engines.openvino import OV_MANIFEST  # noqa: E402
from qdiff.engines.openvino.export import export_openvino  # noqa: E402
from qdiff.engines.openvino.runtime import load_openvino, read_ov_manifest  # noqa: E402

PROMPTS = ["a red circle on the left", "a photo of a cat"]


def _images(pipe, steps: int = 2) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, generator=gens, num_inference_steps=steps, guidance_scale=1.0, output_type="pt").images


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{name: (qdiff export, OpenVINO folder)} for tiny-sd W8A8 (dynamic) and tiny-sdxl W4A8 (dynamic, groups)."""
    from qdiff.export.resolve import load_pipeline

    root = tmp_path_factory.mktemp("ov")
    out = {}
    for name, model, recipe in (("sd", "builtin:tiny-sd", "w8a8"), ("sdxl", "builtin:tiny-sdxl", "w4a8")):
        export = root / name
        qdiff.save(qdiff.quantize(load_pipeline(model), recipe, progress=False), export)
        out[name] = (export, export_openvino(export, root / f"{name}-ov", progress=False))
    return out


def _read(folder: Path, component: str):
    return ov.Core().read_model(folder / component / "openvino_model.xml")


def test_folder_has_the_optimum_intel_layout(exports):
    _, folder = exports["sd"]
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae_decoder/config.json",
                "text_encoder/config.json", "tokenizer/tokenizer_config.json", OV_MANIFEST):  # fmt: skip
        assert (folder / rel).is_file(), rel
    for part in ("unet", "text_encoder", "vae_decoder"):
        assert (folder / part / "openvino_model.bin").is_file()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][0] == "diffusers"
    unet = _read(folder, "unet")
    assert [p.get_any_name() for p in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.outputs[0].get_any_name() == "out_sample"  # optimum-intel and diffusers read the first output
    sample = unet.inputs[0].get_partial_shape()
    assert sample[0].is_dynamic and sample[2].is_dynamic and sample[3].is_dynamic and not sample[1].is_dynamic
    text = _read(folder, "text_encoder")
    assert [p.get_any_name() for p in text.inputs] == ["input_ids"]
    assert [p.get_any_name() for p in text.outputs][:3] == ["last_hidden_state", "pooler_output", "hidden_states.0"]
    vae = _read(folder, "vae_decoder")
    assert [p.get_any_name() for p in vae.inputs] == ["latent_sample"] and vae.outputs[0].get_any_name() == "sample"
    config = json.loads((folder / "vae_decoder" / "config.json").read_text())
    assert {"scaling_factor", "block_out_channels", "latent_channels"} <= set(config)
    assert "quantization_config" not in json.loads((folder / "unet" / "config.json").read_text())


def test_sdxl_folder_has_pooled_text_embeds_and_time_ids(exports):
    _, folder = exports["sdxl"]
    unet = _read(folder, "unet")
    assert [p.get_any_name() for p in unet.inputs][3:] == ["text_embeds", "time_ids"]
    text2 = _read(folder, "text_encoder_2")
    pooled = text2.outputs[0]
    assert pooled.get_any_name() == "text_embeds" and pooled.get_partial_shape().rank.get_length() == 2
    assert "projection_dim" in json.loads((folder / "text_encoder_2" / "config.json").read_text())
    # 4-bit group-wise codes with dynamic activations: stored as int4
    types = {op.get_output_element_type(0).get_type_name() for op in unet.get_ordered_ops()
             if op.get_type_name() == "Constant"}  # fmt: skip
    assert "i4" in types


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_openvino_images_match_the_torch_run_of_the_same_export(exports, name):
    from qdiff.calib.metrics import ssim

    export, folder = exports[name]
    torch_images = _images(qdiff.load(export))
    ov_images = _images(load_openvino(folder, threads=1))
    assert ov_images.shape == torch_images.shape
    assert float(ssim(ov_images, torch_images).min()) >= 0.999


def test_timestep_sinusoids_stay_f32_under_bf16(exports):
    """bf16 float parts must not compute the timestep embedding's sin / cos in bf16 (docs/openvino.md)."""
    _, folder = exports["sdxl"]
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 1}
    compiled = ov.Core().compile_model(_read(folder, "unet"), "CPU", config)
    names = {p.get_any_name() for p in compiled.outputs}
    assert {"f32.time_proj", "f32.add_time_proj"} <= names
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Sin", "Cos", "Math"):
            assert info["runtimePrecision"].astype(str) == "f32", op.get_friendly_name()


def test_manifest_records_source_recipe_and_precisions(exports):
    export, folder = exports["sd"]
    doc = read_ov_manifest(folder)
    assert doc["recipe"]["name"] == "w8a8" and Path(doc["source"]["path"]) == export
    assert {entry["precision"] for entry in doc["components"].values()} == {"bf16"}  # the measured defaults
    assert doc["dynamic_quantization_group_size"] == 32  # tiny-sd's Linear widths 32..128: a common group of 32
    assert sum(doc["dynamic_quantization_layers"].values()) > 0


def test_a_tampered_folder_is_refused(exports, tmp_path):
    _, folder = exports["sd"]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    weights = copy / "unet" / "openvino_model.bin"
    original = weights.read_bytes()
    data = bytearray(original)
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(QdiffError, match="unet/openvino_model.bin: sha256 mismatch"):
        load_openvino(copy)
    weights.write_bytes(original)
    (copy / "unet" / "extra.xml").write_text("<net/>")
    with pytest.raises(QdiffError, match="unet/extra.xml: file is not listed"):
        load_openvino(copy)


def test_cli_exports_generates_and_refuses_bad_input(exports, tmp_path, capsys):
    from qdiff.cli import main

    export, folder = exports["sd"]
    out = tmp_path / "cli-ov"
    assert main(["export-openvino", str(export), str(out), "--precision", "unet=f32", "--no-progress"]) == 0
    assert "unet f32" in capsys.readouterr().out
    assert read_ov_manifest(out)["components"]["unet"]["precision"] == "f32"
    png = tmp_path / "x.png"
    generate = ["generate", str(out), "--engine", "openvino", "--prompt", "a cat", "--steps", "2", "--out", str(png)]
    assert main(generate) == 0
    assert png.is_file()
    for argv, fragment in (
        (["export-openvino", str(export), str(out)], "already exists"),
        (["export-openvino", str(export), str(tmp_path / "p"), "--precision", "fp8"], "'fp8' is not one of f32, bf16"),
        (["generate", str(export), "--engine", "openvino", "--prompt", "x", "--out", str(png)], "not an OpenVINO"),
        (["generate", str(out), "--engine", "torch", "--prompt", "x", "--out", str(png)], "is an OpenVINO folder"),
        (["generate", str(out), "--dtype", "bfloat16", "--prompt", "x", "--out", str(png)], "take --precision"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qdiff: error:") and fragment in err[0], err
    assert not (tmp_path / "p").exists()


def test_transformer_pipelines_are_refused_with_one_line(tmp_path):
    from qdiff.export.resolve import load_pipeline

    export = tmp_path / "pixart"
    qdiff.save(qdiff.quantize(load_pipeline("builtin:tiny-pixart"), "w8a8", progress=False), export)
    with pytest.raises(QdiffError, match="supports UNet pipelines .* not PixArtTransformer2DModel"):
        export_openvino(export, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_eval_takes_an_openvino_folder_as_a_variant(exports, tmp_path):
    export, folder = exports["sd"]
    result = qdiff.evaluate([str(export), str(folder)], num_prompts=2, batch_size=2, clip=None, quality=None,
                            progress=False)  # fmt: skip
    names = list(result.metrics)
    assert names[:2] == ["w8a8", "w8a8 @openvino"]
    unet = ov.Core().read_model(folder / "unet" / "openvino_model.xml")
    constants = sum(op.get_byte_size() for op in unet.get_ordered_ops() if op.get_type_name() == "Constant")
    assert result.metrics["w8a8 @openvino"]["denoiser_mib"] == pytest.approx(constants / 2**20, rel=1e-6)


def test_optimum_intel_loads_the_folder(exports):
    """optimum-intel's own pipeline class (skipped where it is not installed: it pins older transformers)."""
    pytest.importorskip("optimum.intel")
    from optimum.intel import OVDiffusionPipeline

    _, folder = exports["sd"]
    pipe = OVDiffusionPipeline.from_pretrained(folder, export=False, compile=True)
    images = _images(pipe)
    assert images.shape[0] == len(PROMPTS) and torch.isfinite(images).all()
