"""Outputs written under a private temporary name end with the permissions ``open``/``mkdir`` would give them."""

from __future__ import annotations

import os
import stat

import pytest
from PIL import Image

import qdiff
from qdiff.bench.report import write_atomic
from qdiff.models.tiny import tiny_sd_pipeline
from qdiff.utils.images import save_png
from qdiff.utils.perms import process_umask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_process_umask_reads_the_mask_without_changing_it():
    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027 and process_umask() == 0o027
    finally:
        os.umask(old)


def test_atomic_file_and_export_folder_are_not_private(tmp_path, umask_022):
    report = write_atomic(tmp_path / "r.md", "x\n")
    assert _mode(report) == 0o644  # not mkstemp's 0600
    assert _mode(save_png(Image.new("RGB", (2, 2)), tmp_path / "g.png")) == 0o644
    out = qdiff.save(qdiff.quantize(tiny_sd_pipeline(seed=1), "w8a8", progress=False), tmp_path / "model")
    assert _mode(out) == 0o755  # not mkdtemp's 0700
    assert _mode(out / "qdiff.json") == 0o644
