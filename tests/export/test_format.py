"""Export format versions: a format-1 export written by the old code (tests/fixtures/export-v1, see
tests/fixtures/README.md) loads and draws bit-identical images; format 2 writes every layer-spec field and refuses
unknown keys; NaN/Inf in any floating tensor of the denoiser stops the load with the file and tensor named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdiff
from qdiff.config.layer import LAYER_SPEC_VERSION, LayerQuant
from qdiff.errors import QdiffError
from qdiff.export.manifest import FORMAT_VERSION, read_manifest, sha256_file
from qdiff.quant.transform import quantized_layers

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
V1 = FIXTURES / "export-v1"
PROMPTS = ["a red circle on the left", "a blue car in the snow"]  # as in tests/fixtures/make_export_v1.py


def _draw(pipe) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(11)
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=gen, output_type="pt").images


@pytest.fixture(scope="module")
def v1_images() -> torch.Tensor:
    return load_file(str(FIXTURES / "export-v1.images.safetensors"))["images"]


@pytest.fixture(scope="module")
def v1_loaded():
    return qdiff.load(V1)


@pytest.fixture(scope="module")
def v2_folder(v1_loaded, tmp_path_factory) -> Path:
    """The v1 fixture re-saved by this code (format 2): split layers, BOS-aware K/V and a W8A8 text encoder."""
    return qdiff.save(v1_loaded, tmp_path_factory.mktemp("v2") / "export")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "qdiff.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


# --- format 1 (the committed fixture) -------------------------------------------------------------------------


def test_v1_fixture_is_format_1_with_the_late_fields():
    manifest = read_manifest(V1)
    assert manifest["format_version"] == 1
    entries = manifest["layers"].values()
    assert all("spec_version" not in e["quant"] for e in entries)
    assert any(e["quant"]["a_split"] for e in entries) and any("bos" in e for e in entries)
    assert any("bos" not in e for e in entries)  # format 1: no bos key on plain layers
    assert {e["quant"]["w_bits"] for e in entries} == {2, 4, 8} and any(e["quant"]["a_bits"] is None for e in entries)
    assert "text_encoder" in manifest["text_encoders"]


def test_v1_fixture_draws_bit_identical_images(v1_loaded, v1_images):
    assert torch.equal(_draw(v1_loaded), v1_images)
    layers = quantized_layers(v1_loaded.unet)
    assert sum(m.qcfg.a_split is not None for m in layers.values()) == 6
    assert sum(hasattr(m, "bos_mode") for m in layers.values()) == 8


def test_v1_resaves_as_v2_and_still_draws_the_same(v2_folder, v1_loaded, v1_images):
    manifest = read_manifest(v2_folder)
    assert manifest["format_version"] == FORMAT_VERSION == 2
    fields = set(LayerQuant.__dataclass_fields__)
    for entry in manifest["layers"].values():
        assert set(entry) == {"weight_shape", "quant", "bos"}
        assert set(entry["quant"]) == fields | {"spec_version"} and entry["quant"]["spec_version"] == 2
    bos = {n: e["bos"] for n, e in manifest["layers"].items()}
    old = read_manifest(V1)["layers"]
    assert bos == {n: e.get("bos", "none") for n, e in old.items()}  # absent in format 1 = "none" in format 2
    assert {n: {**e["quant"], "spec_version": 1} for n, e in old.items()} == {
        n: {**e["quant"], "spec_version": 1} for n, e in manifest["layers"].items()
    }  # same specs
    reloaded = qdiff.load(v2_folder)
    assert torch.equal(_draw(reloaded), v1_images)


# --- layer specs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        LayerQuant(),
        LayerQuant(w_bits=4, granularity="group", group_size=64, method="mse", a_bits=None),
        LayerQuant(w_bits=2, a_mode="static", a_split=320),
    ],
)
def test_layer_spec_round_trip(spec):
    data = spec.to_dict()
    assert data["spec_version"] == LAYER_SPEC_VERSION == 2
    assert set(data) == {"spec_version", *LayerQuant.__dataclass_fields__}  # every field, written explicitly
    assert LayerQuant.from_dict(json.loads(json.dumps(data))) == spec


def test_layer_spec_versions():
    v1 = {"w_bits": 4, "granularity": "channel", "group_size": None, "method": "minmax", "a_bits": 8}
    assert LayerQuant.from_dict(v1) == LayerQuant(w_bits=4)  # fields added since (a_mode, a_split) take defaults
    assert LayerQuant.from_dict({**v1, "spec_version": 1}) == LayerQuant(w_bits=4)
    with pytest.raises(QdiffError, match=r"^L: layer spec version 2 lacks key 'a_mode'$"):
        LayerQuant.from_dict({**v1, "spec_version": 2}, where="L")
    for bad in (3, "2", True, None):
        with pytest.raises(
            QdiffError, match=rf"^L: layer spec version {bad!r} is not supported \(this qdiff reads 1, 2\)"
        ):
            LayerQuant.from_dict({**v1, "spec_version": bad}, where="L")


def test_layer_spec_refuses_unknown_keys_and_bad_values():
    data = {**LayerQuant().to_dict(), "foo": 1}
    with pytest.raises(QdiffError, match=r"^layers\.x\.quant: unknown key 'foo' in layer spec \(known: w_bits, "):
        LayerQuant.from_dict(data, where="layers.x.quant")
    with pytest.raises(QdiffError, match=r"^layer spec: w_bits must be one of"):
        LayerQuant.from_dict({**LayerQuant().to_dict(), "w_bits": 5})
    with pytest.raises(QdiffError, match=r"^layer spec: expected a mapping of layer-spec fields, got list"):
        LayerQuant.from_dict([])  # type: ignore[arg-type]


# --- format 2 manifests: refusals -----------------------------------------------------------------------------


def _first_layer(doc) -> dict:
    return next(iter(doc["layers"].values()))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: _first_layer(d)["quant"].update(foo=1),
            r"layers\.time_embedding\.linear_1\.quant: unknown key 'foo'",
        ),
        (lambda d: _first_layer(d).update(extra=1), r"layers\.time_embedding\.linear_1: unknown key 'extra'"),
        (lambda d: _first_layer(d).pop("bos"), r"layers\.time_embedding\.linear_1: missing key 'bos'"),
        (
            lambda d: _first_layer(d)["quant"].pop("a_split"),
            r"linear_1\.quant: layer spec version 2 lacks key 'a_split'",
        ),
        (lambda d: _first_layer(d).update(bos="always"), r"linear_1: bos must be one of none, cached, per_call"),
        (lambda d: _first_layer(d)["quant"].pop("spec_version"), r"linear_1\.quant: format 2 writes spec_version 2"),
        (lambda d: d.update(format_version=3), r"format version 3 is not supported \(this qdiff reads 1, 2\)"),
        (lambda d: d.update(format_version="2"), r"format version '2' is not supported"),
        (lambda d: d["denoiser"].update({"class": "UNet2DModel"}), r"denoiser class 'UNet2DModel' is not supported"),
    ],
)
def test_v2_manifest_refusals_name_the_key(v2_folder, tmp_path, change, message):
    folder = _copy(v2_folder, tmp_path)
    _edit_manifest(folder, change)  # qdiff.json itself is not hashed: only these checks can catch it
    with pytest.raises(QdiffError, match=r"qdiff\.json: .*" + message):
        qdiff.load(folder)


def test_v1_manifest_with_an_unknown_spec_key_is_refused(tmp_path):
    folder = _copy(V1, tmp_path)
    _edit_manifest(folder, lambda d: _first_layer(d)["quant"].update(w_bitz=8))
    with pytest.raises(
        QdiffError, match=r"qdiff\.json: layers\.time_embedding\.linear_1\.quant: unknown key 'w_bitz'"
    ):
        qdiff.load(folder)


# --- non-finite tensors ------------------------------------------------------------------------------------


def _tamper(folder: Path, key: str, values: tuple[float, ...]) -> None:
    """Write ``values`` into elements of ``key`` and re-sign the hash, so only the finite check can object."""
    path = folder / "unet" / "qdiff.safetensors"
    tensors = load_file(str(path))
    t = tensors[key].clone()
    for i, value in enumerate(values):
        t.view(-1)[(t.numel() // 2 + i) % t.numel()] = value
    tensors[key] = t
    save_file(tensors, str(path), metadata={"format": "pt", "qdiff": "1"})
    _edit_manifest(folder, lambda d: d["files"].update({"unet/qdiff.safetensors": sha256_file(path)}))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "key, values, counts",
    [
        ("down_blocks.0.attentions.0.proj_in.w_scale", (NAN,), "1 NaN value"),  # a quantization scale
        ("conv_in.weight", (INF,), "1 Inf value"),  # a float-kept (protected) weight
        ("up_blocks.1.resnets.0.conv1.a_scale", (-INF,), "1 Inf value"),  # a split activation scale
        ("time_embedding.linear_1.bias", (NAN,), "1 NaN value"),  # a bias
        ("conv_out.weight", (NAN, INF, NAN), "2 NaN and 1 Inf values"),
    ],
)
@pytest.mark.parametrize("source", ["v1", "v2"])
def test_non_finite_tensor_is_refused(source, key, values, counts, v2_folder, tmp_path):
    folder = _copy(V1 if source == "v1" else v2_folder, tmp_path)
    _tamper(folder, key, values)
    message = rf"unet/qdiff\.safetensors: tensor '{key}' has {counts} \(corrupt export\?\)$"
    with pytest.raises(QdiffError, match=message):
        qdiff.load(folder)
