"""The diffusers backend refuses what qdiff.load refuses: manifest paths and symbolic links leading outside the export,
checked before any file outside is read (issue 22, item 5)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import copy_export, recording_opens

from qdiff.errors import QdiffError
from qdiff.utils.hashing import sha256_file

pytest.importorskip("qdiff.integrations.diffusers")
from diffusers import DiffusionPipeline, UNet2DConditionModel  # noqa: E402

LOADERS: dict[str, Callable[[Path], object]] = {
    "pipeline": lambda folder: DiffusionPipeline.from_pretrained(folder),
    "unet": lambda folder: UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
}


@pytest.fixture
def export(tiny_w8a8_export) -> Path:
    return tiny_w8a8_export


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
    folder = copy_export(export, tmp_path)
    manifest = json.loads((folder / "qdiff.json").read_text())
    manifest["files"]["../outside.json"] = sha256_file(outside)  # the right sha256 of a real file
    (folder / "qdiff.json").write_text(json.dumps(manifest))
    with recording_opens() as opened:
        message = _refused(LOADERS[loader], folder, folder / "qdiff.json")
    assert "'../outside.json' is not a path inside the export" in message
    assert not [p for p in opened if Path(p).name == "outside.json"], opened


@pytest.mark.parametrize("loader", list(LOADERS))
def test_symlinked_weights_to_outside_are_refused_unread(export, tmp_path, loader):
    folder = copy_export(export, tmp_path)
    link, outside = folder / "unet" / "qdiff.safetensors", tmp_path / "outside.safetensors"
    shutil.move(link, outside)  # same bytes: the listed sha256 still matches
    link.symlink_to(outside)
    with recording_opens() as opened:
        message = _refused(LOADERS[loader], folder, link)
    assert f"symbolic link to {outside}, outside the export" in message
    assert not {str(link), str(outside)} & set(opened), opened


@pytest.mark.parametrize("loader", list(LOADERS))
def test_symlinked_directory_to_outside_is_refused(export, tmp_path, loader):
    folder = copy_export(export, tmp_path)
    outside = tmp_path / "vae-elsewhere"
    shutil.move(folder / "vae", outside)
    (folder / "vae").symlink_to(outside, target_is_directory=True)
    assert f"symbolic link to {outside}, outside the export" in _refused(LOADERS[loader], folder, folder / "vae")


def test_symlinked_config_of_another_component_is_refused(export, tmp_path):
    """diffusers loads the pipeline's components in an order that varies from run to run (a set's order), so the
    VAE may be read before the UNet's quantizer runs; the load is refused either way."""
    folder = copy_export(export, tmp_path)
    link, outside = folder / "vae" / "config.json", tmp_path / "vae-config.json"
    shutil.move(link, outside)
    link.symlink_to(outside)
    assert f"symbolic link to {outside}, outside the export" in _refused(LOADERS["pipeline"], folder, link)
