"""The diffusers backend refuses what qdiff.load refuses: manifest paths and symbolic links leading outside the export,
checked before any file outside is read (issue 22, item 5)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import recording_opens

import qdiff
from qdiff.errors import QdiffError
from qdiff.models.tiny import tiny_sd_pipeline

pytest.importorskip("qdiff.integrations.diffusers")
from diffusers import DiffusionPipeline, UNet2DConditionModel  # noqa: E402

LOADERS: dict[str, Callable[[Path], object]] = {
    "pipeline": lambda folder: DiffusionPipeline.from_pretrained(folder),
    "unet": lambda folder: UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    pipe = qdiff.quantize(tiny_sd_pipeline(seed=3), "w8a8", progress=False)
    return qdiff.save(pipe, tmp_path_factory.mktemp("diffusers-refusals") / "model")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(export: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(export, dst)
    return dst


def _refused(load: Callable[[Path], object], folder: Path, names: Path) -> str:
    with pytest.raises(QdiffError) as info:
        load(folder)
    message = str(info.value)
    assert "\n" not in message and str(names) in message, message
    return message


def test_the_export_loads_both_ways(export):
    for load in LOADERS.values():
        load(export)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_parent_path_in_files_is_refused_unread(export, tmp_path, loader):
    outside = tmp_path / "outside.json"
    outside.write_text('{"secret": 1}')
    folder = _copy(export, tmp_path)
    manifest = json.loads((folder / "qdiff.json").read_text())
    manifest["files"]["../outside.json"] = _sha(outside)  # the right sha256 of a real file
    (folder / "qdiff.json").write_text(json.dumps(manifest))
    with recording_opens() as opened:
        message = _refused(LOADERS[loader], folder, folder / "qdiff.json")
    assert "'../outside.json' is not a path inside the export" in message
    assert not [p for p in opened if Path(p).name == "outside.json"], opened


@pytest.mark.parametrize("loader", list(LOADERS))
def test_symlinked_weights_to_outside_are_refused_unread(export, tmp_path, loader):
    folder = _copy(export, tmp_path)
    link, outside = folder / "unet" / "qdiff.safetensors", tmp_path / "outside.safetensors"
    shutil.move(link, outside)  # same bytes: the listed sha256 still matches
    link.symlink_to(outside)
    with recording_opens() as opened:
        message = _refused(LOADERS[loader], folder, link)
    assert f"symbolic link to {outside}, outside the export" in message
    assert not {str(link), str(outside)} & set(opened), opened


@pytest.mark.parametrize("loader", list(LOADERS))
def test_symlinked_directory_to_outside_is_refused(export, tmp_path, loader):
    folder = _copy(export, tmp_path)
    outside = tmp_path / "vae-elsewhere"
    shutil.move(folder / "vae", outside)
    (folder / "vae").symlink_to(outside, target_is_directory=True)
    assert f"symbolic link to {outside}, outside the export" in _refused(LOADERS[loader], folder, folder / "vae")


def test_symlinked_config_of_another_component_is_refused(export, tmp_path):
    """diffusers loads the pipeline's components in an order that varies from run to run (a set's order), so the
    VAE may be read before the UNet's quantizer runs; the load is refused either way."""
    folder = _copy(export, tmp_path)
    link, outside = folder / "vae" / "config.json", tmp_path / "vae-config.json"
    shutil.move(link, outside)
    link.symlink_to(outside)
    assert f"symbolic link to {outside}, outside the export" in _refused(LOADERS["pipeline"], folder, link)
