"""Single-file ``.safetensors`` checkpoints: safetensors only, configs from --config or beside the file, one-line
errors, and the pipeline class / config folder / offline flag handed to diffusers' ``from_single_file``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qdiff.cli import main
from qdiff.errors import QdiffError
from qdiff.export.resolve import load_pipeline


def _index(folder, cls="StableDiffusionPipeline"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls, "_diffusers_version": "0.30.0"}))
    return folder


def _weights(path):
    save_file({"w": torch.zeros(2)}, str(path))
    return path


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_formats_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(QdiffError, match=r"only \.safetensors .* pickles") as err:
        load_pipeline(str(path), config=_index(tmp_path / "cfg"))
    assert "\n" not in str(err.value)


def test_missing_config_is_one_clear_line(tmp_path):
    path = _weights(tmp_path / "model.safetensors")
    with pytest.raises(QdiffError, match="needs the pipeline configs: pass --config FOLDER") as err:
        load_pipeline(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(QdiffError, match="--config .*: no model_index.json"):
        load_pipeline(str(path), config=tmp_path / "nowhere")


def test_unknown_pipeline_class(tmp_path):
    path = _weights(tmp_path / "model.safetensors")
    with pytest.raises(QdiffError, match="'NoSuchPipeline' cannot load single-file checkpoints"):
        load_pipeline(str(path), config=_index(tmp_path / "cfg", "NoSuchPipeline"))


def test_dispatch_to_from_single_file(tmp_path, monkeypatch):
    """The class named in model_index.json loads the file with the config folder, offline, in the asked dtype;
    a model_index.json beside the file is found without --config."""
    import diffusers

    calls = []

    class Loaded:
        def set_progress_bar_config(self, **kwargs):
            calls.append(("progress", kwargs))

    def fake(cls, path, **kwargs):
        calls.append((cls.__name__, path, kwargs))
        return Loaded()

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_single_file", classmethod(fake))
    path = _weights(tmp_path / "sdxl-turbo.safetensors")
    cfg = _index(tmp_path / "cfg", "StableDiffusionXLPipeline")
    assert isinstance(load_pipeline(str(path), torch_dtype="fp16", config=cfg), Loaded)
    name, got_path, kwargs = calls[0]
    assert (name, got_path) == ("StableDiffusionXLPipeline", str(path))
    assert kwargs["config"] == str(cfg) and kwargs["local_files_only"] is True
    assert torch.float16 in kwargs.values()
    _index(tmp_path, "StableDiffusionXLPipeline")  # sibling model_index.json
    load_pipeline(str(path))
    assert [c for c in calls if c[0] != "progress"][-1][2]["config"] == str(tmp_path)


def test_unloadable_file_is_one_line(tmp_path, capsys):
    """A real diffusers loader on a file that is not an SD checkpoint fails with one qdiff line (CLI exit 1)."""
    path = _weights(tmp_path / "model.safetensors")
    cfg = _index(tmp_path / "cfg")
    argv = ["quantize", "--model", str(path), "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qdiff:")]  # (diffusers' bar)
    assert len(ours) == 1 and ours[0].startswith("qdiff: error: could not load single-file checkpoint")
