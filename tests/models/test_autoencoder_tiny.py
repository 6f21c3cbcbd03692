"""The Shapes model (an AutoencoderTiny VAE in a StableDiffusionPipeline) loads without warnings: builtin, its
exports (new ones are written clean, older ones are loaded quietly), the API and the CLI."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import qdiff
import qdiff.export.save as save_module
from qdiff.export.resolve import load_pipeline
from qdiff.models.autoencoder_tiny import clean_config, quiet_tiny_vae
from qdiff.models.shapes.models import VAE_CONFIG
from qdiff.models.shapes.pipeline import WEIGHTS_DIR, bundled

DERIVED = "The config attributes {'block_out_channels': [48, 48, 48]} were passed to AutoencoderTiny, but are not expected and will be ignored. Please verify your config.json configuration file."  # noqa: E501
KL, TINY = (
    "diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL",
    "diffusers.models.autoencoders.autoencoder_tiny.AutoencoderTiny",
)  # noqa: E501
VAE_TYPE = f"Expected types for vae: (<class '{KL}'>,), got <class '{TINY}'>."
needs_weights = pytest.mark.skipif(not bundled(), reason="the Shapes weights are not installed")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """Every warning (warnings module) and every log record at WARNING or above from diffusers, transformers or
    anything propagating to the root logger, as lines."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("", "diffusers", "transformers")]  # diffusers: propagate=False
    for logger in loggers:
        logger.addHandler(handler)
    lines: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield lines
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    lines += [f"{w.category.__name__}: {w.message}" for w in caught]
    lines += [f"{r.name} {r.levelname}: {r.getMessage()}" for r in handler.records]


def test_clean_config_drops_only_the_derived_key(tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    AutoencoderTiny(**VAE_CONFIG).save_pretrained(tmp_path / "tiny")
    written = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert written["block_out_channels"] == list(VAE_CONFIG["decoder_block_out_channels"])  # diffusers adds it
    assert clean_config(tmp_path / "tiny") and not clean_config(tmp_path / "tiny")
    cleaned = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert cleaned == {k: v for k, v in written.items() if k != "block_out_channels"}
    with captured() as lines:
        vae = AutoencoderTiny.from_pretrained(tmp_path / "tiny")
    assert lines == [] and list(vae.config.block_out_channels) == list(VAE_CONFIG["decoder_block_out_channels"])

    AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8).save_pretrained(tmp_path / "kl")
    before = (tmp_path / "kl" / "config.json").read_bytes()
    assert not clean_config(tmp_path / "kl") and (tmp_path / "kl" / "config.json").read_bytes() == before
    assert not clean_config(tmp_path / "absent")


def test_quiet_tiny_vae_drops_exactly_the_two_false_alarms():
    config, pipeline = (
        logging.getLogger("diffusers.configuration_utils"),
        logging.getLogger("diffusers.pipelines.pipeline_utils"),
    )
    kept = [
        (config, DERIVED.replace("'block_out_channels': [48, 48, 48]", "'block_out_channels': [48], 'act': 1")),
        (config, DERIVED.replace("AutoencoderTiny", "AutoencoderKL")),
        (pipeline, VAE_TYPE.replace("AutoencoderTiny'", "UNet2DConditionModel'")),
        (pipeline, VAE_TYPE.replace("for vae", "for unet")),
        (pipeline, DERIVED),  # the right text from the wrong logger
    ]
    with captured() as lines, quiet_tiny_vae():
        config.warning(DERIVED)
        pipeline.warning(VAE_TYPE)
        for logger, message in kept:
            logger.warning(message)
    assert lines == [f"{logger.name} WARNING: {message}" for logger, message in kept]
    with captured() as lines:  # outside the block nothing is dropped
        config.warning(DERIVED)
    assert len(lines) == 1


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path]:
    """(a Shapes W8A8 export as written now, the same written as before: vae config with the derived key)."""
    root = tmp_path_factory.mktemp("shapes")
    pipe = qdiff.quantize(load_pipeline("builtin:shapes"), "shapes-w8a8", progress=False)
    new = qdiff.save(pipe, root / "new")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(save_module, "clean_config", lambda folder: False)
        old = qdiff.save(pipe, root / "old")
    return new, old


@needs_weights
def test_shipped_configs_carry_no_unexpected_key():
    vae = json.loads((WEIGHTS_DIR / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "AutoencoderTiny" and "block_out_channels" not in vae


@needs_weights
def test_builtin_and_exports_load_without_warnings(exports):
    new, old = exports
    assert "block_out_channels" not in json.loads((new / "vae" / "config.json").read_text())
    assert "block_out_channels" in json.loads((old / "vae" / "config.json").read_text())
    for load in (lambda: load_pipeline("builtin:shapes"), lambda: qdiff.load(new), lambda: qdiff.load(old),
                 lambda: load_pipeline(str(old))):  # fmt: skip
        with captured() as lines:
            pipe = load()
        assert lines == []
        assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.vae).__name__ == "AutoencoderTiny"
    assert json.loads((new / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


@needs_weights
def test_new_export_loads_in_plain_diffusers_with_the_same_vae(exports):
    """Dropping the derived key changes nothing diffusers builds: the same VAE config and the same decoded image."""
    from diffusers import AutoencoderTiny

    new, old = exports
    a, b = AutoencoderTiny.from_pretrained(new / "vae"), AutoencoderTiny.from_pretrained(old / "vae")
    assert {**a.config, "_name_or_path": ""} == {**b.config, "_name_or_path": ""}
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.decode(latents).sample, b.decode(latents).sample)


_PROGRESS = re.compile(r"^\s*(\S.*: *)?\d+%\|.*\|.*\]\s*$")  # a tqdm bar (diffusers, transformers, sampling)


@needs_weights
def test_generate_cli_on_a_shapes_export_prints_no_warning(exports, tmp_path):
    _, old = exports  # the older form: both of diffusers' false alarms would fire
    exe = shutil.which("qdiff") or str(Path(sys.executable).parent / "qdiff")
    png = tmp_path / "circle.png"
    done = subprocess.run([exe, "generate", str(old), "--prompt", "a red circle", "--steps", "1", "--out", str(png)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip() and not _PROGRESS.match(line)]
    assert lines == [] and png.is_file()
