"""Two diffusers false alarms about an ``AutoencoderTiny`` VAE in a Stable Diffusion pipeline (the Shapes model's).

* ``AutoencoderTiny.__init__`` registers ``block_out_channels`` (a copy of ``decoder_block_out_channels``) in its
  config, so ``save_pretrained`` writes it, and every later ``from_pretrained`` warns "The config attributes
  {'block_out_channels': [...]} were passed to AutoencoderTiny, but are not expected and will be ignored".
  :func:`clean_config` removes such derived keys from a written ``config.json`` (qdiff's exports are written clean;
  the shipped Shapes weights were, by ``qdiff.models.shapes.train_unet``).
* ``StableDiffusionPipeline`` annotates ``vae: AutoencoderKL``, so ``from_pretrained`` warns "Expected types for vae:
  AutoencoderKL, got AutoencoderTiny" although diffusers documents the tiny VAE (TAESD) as a drop-in there. Exports
  keep naming the plain ``StableDiffusionPipeline`` (plain diffusers loads them, with that notice).

:func:`quiet_tiny_vae` drops exactly these two records (and only these: any other key or type mismatch still
reaches the log) while qdiff loads a pipeline, so exports written before :func:`clean_config` load quietly too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# class name -> keys its __init__ registers itself (derived from another key) and from_pretrained then rejects
DERIVED_KEYS: dict[str, tuple[str, ...]] = {"AutoencoderTiny": ("block_out_channels",)}

_CONFIG_LOGGER = "diffusers.configuration_utils"
_PIPELINE_LOGGER = "diffusers.pipelines.pipeline_utils"
_DERIVED = re.compile(r"The config attributes \{'block_out_channels': \[[0-9, ]*\]\} were passed to AutoencoderTiny,")
_VAE_TYPE = re.compile(
    r"Expected types for vae: \(<class '[\w.]+\.AutoencoderKL'>,\), got <class '[\w.]+\.AutoencoderTiny'>\.$"
)


def clean_config(folder: Path) -> bool:
    """Drop the derived keys of :data:`DERIVED_KEYS` from ``folder/config.json``; True when the file changed."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    derived = DERIVED_KEYS.get(config.get("_class_name")) if isinstance(config, dict) else None
    if not derived or not any(key in config for key in derived):
        return False
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in derived}, indent=2, sort_keys=True) + "\n")
    return True


class _DropTinyVaeNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        pattern = _DERIVED if record.name == _CONFIG_LOGGER else _VAE_TYPE
        return pattern.match(record.getMessage()) is None


@contextmanager
def quiet_tiny_vae() -> Iterator[None]:
    """Within the block, diffusers' two AutoencoderTiny false alarms (module docstring) are not logged."""
    drop = _DropTinyVaeNotices()
    loggers = [logging.getLogger(name) for name in (_CONFIG_LOGGER, _PIPELINE_LOGGER)]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
