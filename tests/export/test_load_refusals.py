"""qdiff.load refuses paths and symbolic links leading outside the export (before reading anything there) and turns
every malformed JSON it reads into a one-line QdiffError naming the file (issue 22, item 5)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import copy_export, recording_opens

import qdiff
from qdiff.cli import main
from qdiff.errors import QdiffError
from qdiff.export.load import load_denoiser_export
from qdiff.utils.hashing import sha256_file


@pytest.fixture
def export(tiny_w8a8_export) -> Path:
    return tiny_w8a8_export


def _manifest(folder: Path, change: Callable[[dict], object]) -> None:
    path = folder / "qdiff.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _rewrite(folder: Path, rel: str, text: str) -> None:
    """Replace one file and re-sign its sha256 in the manifest (a consistent but malicious or broken export)."""
    path = folder / rel
    path.write_text(text)
    _manifest(folder, lambda m: m["files"].update({rel: sha256_file(path)}))


def _refused(folder: Path, names: str | Path, load=qdiff.load) -> str:
    """``load(folder)`` raises a one-line QdiffError (no other exception type) whose message names ``names``."""
    with pytest.raises(QdiffError) as info:
        load(folder)
    message = str(info.value)
    assert "\n" not in message and str(names) in message, message
    return message


# --- paths and symbolic links ---------------------------------------------------------------------------------
@pytest.mark.parametrize("load", [qdiff.load, load_denoiser_export], ids=["load", "load_denoiser_export"])
def test_parent_path_in_files_is_refused_before_the_outside_file_is_read(export, tmp_path, load):
    outside = tmp_path / "outside.json"
    outside.write_text('{"secret": 1}')
    folder = copy_export(export, tmp_path)
    _manifest(folder, lambda m: m["files"].update({"../outside.json": sha256_file(outside)}))  # the right sha256
    with recording_opens() as opened:
        message = _refused(folder, folder / "qdiff.json", load)
    assert "'../outside.json' is not a path inside the export" in message
    assert not [p for p in opened if Path(p).name == "outside.json"], opened


def test_absolute_path_in_files_is_refused_before_the_file_is_read(export, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"secret": 1}')
    folder = copy_export(export, tmp_path)
    _manifest(folder, lambda m: m["files"].update({str(outside): sha256_file(outside)}))
    with recording_opens() as opened:
        message = _refused(folder, folder / "qdiff.json")
    assert f"{str(outside)!r} is not a path inside the export" in message
    assert str(outside) not in opened


def test_symlinked_file_to_outside_is_refused_unread(export, tmp_path):
    folder = copy_export(export, tmp_path)
    outside = tmp_path / "vae-config.json"
    shutil.move(folder / "vae" / "config.json", outside)  # same bytes: its listed sha256 still matches
    (folder / "vae" / "config.json").symlink_to(outside)
    with recording_opens() as opened:
        message = _refused(folder, folder / "vae" / "config.json")
    assert f"symbolic link to {outside}, outside the export" in message
    assert not {str(outside), str(folder / "vae" / "config.json")} & set(opened), opened


def test_symlinked_directory_to_outside_is_refused_unread(export, tmp_path):
    folder = copy_export(export, tmp_path)
    outside = tmp_path / "vae-elsewhere"
    shutil.move(folder / "vae", outside)
    (folder / "vae").symlink_to(outside, target_is_directory=True)
    with recording_opens() as opened:
        message = _refused(folder, folder / "vae")
    assert f"symbolic link to {outside}, outside the export" in message
    under = [Path(p) for p in opened if p.startswith(str(tmp_path))]
    assert not [p for p in under if {"vae", "vae-elsewhere"} & set(p.parts)], opened


def test_symlink_inside_the_export_is_refused_too(export, tmp_path):
    """Exports hold plain files (qdiff writes no links): a link is refused even when it stays inside."""
    folder = copy_export(export, tmp_path)
    (folder / "vae" / "config.json").rename(folder / "vae" / "real.json")
    (folder / "vae" / "config.json").symlink_to("real.json")
    assert "symbolic link inside the export" in _refused(folder, folder / "vae" / "config.json")


def test_symlinked_manifest_is_refused_unread(export, tmp_path):
    folder = copy_export(export, tmp_path)
    outside = tmp_path / "manifest.json"
    shutil.move(folder / "qdiff.json", outside)
    (folder / "qdiff.json").symlink_to(outside)
    with recording_opens() as opened:
        _refused(folder, folder / "qdiff.json")
    assert not {str(outside), str(folder / "qdiff.json")} & set(opened), opened


def test_fifo_is_refused_without_opening_it(export, tmp_path):
    folder = copy_export(export, tmp_path)
    os.mkfifo(folder / "vae" / "extra.json")  # reading it would block forever
    assert "not a regular file" in _refused(folder, folder / "vae" / "extra.json")


def _hub_snapshot(export: Path, root: Path) -> Path:
    """The export laid out as huggingface_hub caches a download: snapshot files linking into ``blobs/``."""
    repo = root / "models--org--export"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    blobs.mkdir(parents=True)
    for path in sorted(p for p in export.rglob("*") if p.is_file()):
        link = snapshot / path.relative_to(export)
        link.parent.mkdir(parents=True, exist_ok=True)
        blob = blobs / sha256_file(path)
        shutil.copy(path, blob)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_huggingface_cache_snapshot_loads_but_a_link_out_of_its_blobs_does_not(export, tmp_path):
    snapshot = _hub_snapshot(export, tmp_path / "hub")
    assert type(qdiff.load(snapshot)).__name__ == "StableDiffusionPipeline"
    config = snapshot / "vae" / "config.json"
    outside = tmp_path / "vae-config.json"
    shutil.copy(config, outside)
    config.unlink()
    config.symlink_to(outside)  # same bytes, but not a blob of this repository
    assert f"symbolic link to {outside}, outside the export" in _refused(snapshot, config)


# --- malformed JSON and configs ---------------------------------------------------------------------------------
def test_class_name_list_in_model_index(export, tmp_path):
    folder = copy_export(export, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    _rewrite(folder, "model_index.json", json.dumps({**index, "_class_name": ["pipeline", "StableDiffusionPipeline"]}))
    assert "_class_name must be a pipeline class name" in _refused(folder, folder / "model_index.json")


def test_model_index_that_is_a_json_list(export, tmp_path):
    folder = copy_export(export, tmp_path)
    _rewrite(folder, "model_index.json", json.dumps([json.loads((folder / "model_index.json").read_text())]))
    assert "expected a JSON object, got a list" in _refused(folder, folder / "model_index.json")


@pytest.mark.parametrize("value", ["AutoencoderKL", True, ["diffusers"], ["diffusers", 3]])
def test_component_entry_of_the_wrong_type_in_model_index(export, tmp_path, value):
    folder = copy_export(export, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    _rewrite(folder, "model_index.json", json.dumps({**index, "vae": value}))
    assert "vae: expected [library, class]" in _refused(folder, folder / "model_index.json")


def test_unknown_pipeline_class_in_model_index(export, tmp_path):
    folder = copy_export(export, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    _rewrite(folder, "model_index.json", json.dumps({**index, "_class_name": "logging"}))
    assert "'logging' is not a pipeline class" in _refused(folder, folder / "model_index.json")


@pytest.mark.parametrize("rel", ["vae/config.json", "unet/config.json", "scheduler/scheduler_config.json"])
def test_component_config_that_is_not_an_object(export, tmp_path, rel):
    folder = copy_export(export, tmp_path)
    _rewrite(folder, rel, "[1, 2]")
    assert "expected a JSON object, got a list" in _refused(folder, folder / rel)


def test_component_config_that_is_not_json(export, tmp_path):
    folder = copy_export(export, tmp_path)
    _rewrite(folder, "text_encoder/config.json", '{"hidden_size": ')
    assert "not valid JSON" in _refused(folder, folder / "text_encoder" / "config.json")


def test_denoiser_config_with_a_bad_value(export, tmp_path):
    folder = copy_export(export, tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    _rewrite(folder, "unet/config.json", json.dumps({**config, "block_out_channels": "wide"}))
    assert "does not build a UNet2DConditionModel" in _refused(folder, folder / "unet" / "config.json")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"weight_map": ', "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"weight_map": []}', 'no "weight_map" mapping'),
        ('{"weight_map": {"conv_in.weight": "../qdiff.safetensors"}}', "is not a file name in this folder"),
        ('{"weight_map": {"conv_in.weight": 7}}', "is not a file name in this folder"),
    ],
)
def test_malformed_shard_index(export, tmp_path, text, says):
    folder = copy_export(export, tmp_path)
    rel = "unet/qdiff.safetensors.index.json"
    _rewrite(folder, rel, text)
    _manifest(folder, lambda m: m["denoiser"].update(weights=rel))
    assert says in _refused(folder, folder / rel)


def test_qsched_sidecar_that_is_not_an_object(export, tmp_path):
    folder = copy_export(export, tmp_path)
    _rewrite(folder, "scheduler/qsched.json", "[1.0, 1.0]")
    assert "expected a JSON object" in _refused(folder, folder / "scheduler" / "qsched.json")


def _first_layer(m: dict) -> dict:
    return next(iter(m["layers"].values()))


def _encoder(weights: str, layers: object = None) -> Callable[[dict], object]:
    entry = {"class": "CLIPTextModel", "mode": "w8a8", "weights": weights, "layers": {} if layers is None else layers}
    return lambda m: m.update(text_encoders={"text_encoder": entry})


BAD_MANIFESTS = {
    "files-list": (lambda m: m.update(files=[]), "field 'files' missing or not a mapping"),
    "files-digest-number": (lambda m: m["files"].update({"vae/config.json": 5}), "files['vae/config.json']"),
    "files-digest-short": (lambda m: m["files"].update({"vae/config.json": "abc"}), "64 lowercase hex digits"),
    "files-empty-part": (lambda m: m["files"].update({"vae//config.json": "0" * 64}), "not a path inside"),
    "denoiser-list": (lambda m: m.update(denoiser=["unet"]), "field 'denoiser' missing or not a mapping"),
    "denoiser-class-list": (lambda m: m["denoiser"].update({"class": ["UNet2DConditionModel"]}), "denoiser.class"),
    "denoiser-weights-number": (lambda m: m["denoiser"].update(weights=3), "denoiser.weights: expected a string"),
    "denoiser-weights-outside": (lambda m: m["denoiser"].update(weights="../x.safetensors"), "denoiser.weights"),
    "denoiser-attr-parent": (lambda m: m["denoiser"].update(attr=".."), "denoiser.attr"),
    "denoiser-family-number": (lambda m: m["denoiser"].update(family=1), "denoiser: family must be a string"),
    "layers-list": (lambda m: m.update(layers=[]), "field 'layers' missing or not a mapping"),
    "layer-entry-list": (lambda m: m["layers"].update(conv_in=[8]), "layers.conv_in: expected a mapping"),
    "layer-quant-string": (lambda m: _first_layer(m).update(quant="w8a8"), "expected a mapping with a 'quant'"),
    "layer-shape-string": (lambda m: _first_layer(m).update(weight_shape="32x4"), "weight_shape: expected a list"),
    "layer-bits-string": (lambda m: _first_layer(m)["quant"].update(w_bits="8"), "w_bits must be one of"),
    "torch-dtype-list": (lambda m: m.update(torch_dtype=["float32"]), "torch_dtype must be a string"),
    "torch-dtype-unknown": (lambda m: m.update(torch_dtype="float99"), "torch_dtype: unknown dtype"),
    "recipe-list": (lambda m: m.update(recipe=[]), "recipe must be an object"),
    "recipe-field": (lambda m: m["recipe"].update(weights=8), "recipe: weights: must be a mapping"),
    "plan-list": (lambda m: m.update(plan=[1]), "plan must be an object"),
    "schedule-list": (lambda m: m.update(schedule=[1.0]), "schedule must be an object"),
    "denoiser-only-string": (lambda m: m.update(denoiser_only="yes"), "denoiser_only must be true/false"),
    "text-encoders-list": (lambda m: m.update(text_encoders=["text_encoder"]), "text_encoders must be an object"),
    "text-encoder-weights-outside": (
        _encoder("../model.safetensors"),
        "text_encoders.text_encoder.weights: '../model.safetensors' is not a path inside",
    ),
    "text-encoder-weights-unlisted": (
        _encoder("text_encoder/x.safetensors"),
        "text_encoders.text_encoder.weights: 'text_encoder/x.safetensors' is not listed in files",
    ),
    "text-encoder-layers-list": (
        _encoder("text_encoder/model.safetensors", layers=[]),
        "text_encoders.text_encoder.layers: expected an object",
    ),
    "text-encoder-string": (lambda m: m.update(text_encoders={"text_encoder": "w8a8"}), "text_encoders.text_encoder"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_manifest_field_of_the_wrong_type(export, tmp_path, case):
    change, says = BAD_MANIFESTS[case]
    folder = copy_export(export, tmp_path)
    _manifest(folder, change)
    assert says in _refused(folder, folder / "qdiff.json")


# --- the CLI prints them as errors, not internal errors ---------------------------------------------------------
def _cli_error(capsys, argv: list[str], names: Path) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qdiff: error:") and str(names) in err[0], err
    return err[0]


def test_cli_inspect_refuses_a_parent_path(export, tmp_path, capsys):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    folder = copy_export(export, tmp_path)
    _manifest(folder, lambda m: m["files"].update({"../outside.json": sha256_file(outside)}))
    _cli_error(capsys, ["inspect", str(folder)], folder / "qdiff.json")


def test_cli_generate_refuses_a_class_name_list(export, tmp_path, capsys):
    folder = copy_export(export, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    _rewrite(folder, "model_index.json", json.dumps({**index, "_class_name": ["x", "StableDiffusionPipeline"]}))
    argv = ["generate", str(folder), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    _cli_error(capsys, argv, folder / "model_index.json")
    assert not (tmp_path / "o.png").exists()


def test_cli_generate_refuses_a_symlinked_file(export, tmp_path, capsys):
    folder = copy_export(export, tmp_path)
    outside = tmp_path / "vae-config.json"
    shutil.move(folder / "vae" / "config.json", outside)
    (folder / "vae" / "config.json").symlink_to(outside)
    argv = ["generate", str(folder), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    _cli_error(capsys, argv, folder / "vae" / "config.json")


def test_the_open_recorder_sees_opens(tmp_path):  # the refusals above assert absences: the recorder must work
    (tmp_path / "a.json").write_text("{}")
    with recording_opens() as opened:
        (tmp_path / "a.json").read_text()
        os.close(os.open(tmp_path / "a.json", os.O_RDONLY))
    assert opened.count(str(tmp_path / "a.json")) == 2
