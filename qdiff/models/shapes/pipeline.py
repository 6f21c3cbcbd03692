"""The bundled Shapes text-to-image model as a standard diffusers ``StableDiffusionPipeline``.

``shapes_pipeline()`` loads the shipped weights (``qdiff/models/shapes/weights/``, diffusers layout:
``unet/``, ``text_encoder/``, ``vae/`` (AutoencoderTiny, factor 4), ``tokenizer/``, ``scheduler/``) and returns
a pipeline whose scheduler is the default few-step sampler: DDIM, trailing timestep spacing, zero-terminal-SNR
betas, v-prediction. Call it with ``num_inference_steps=4, guidance_scale=3.0`` (:data:`DEFAULT_SAMPLER`);
images are 64x64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .models import SCHEDULER_CONFIG

WEIGHTS_DIR = Path(__file__).parent / "weights"

DEFAULT_SAMPLER: dict[str, Any] = {
    "scheduler": "DDIMScheduler",
    "timestep_spacing": "trailing",
    "num_inference_steps": 4,
    "guidance_scale": 3.0,
    "height": 64,
    "width": 64,
}


def default_scheduler():
    """DDIMScheduler with the training betas (zero terminal SNR), trailing spacing, v-prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(SCHEDULER_CONFIG)


def build_pipeline(unet, text_encoder, vae, tokenizer, scheduler=None):
    """Assemble a ``StableDiffusionPipeline`` from parts (no safety checker / feature extractor)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or default_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def quiet_transformers_loading() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers while loading these sub-megabyte models."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def bundled() -> bool:
    """True when this installation ships the Shapes weights (``qdiff/models/shapes/weights/``)."""
    return (WEIGHTS_DIR / "unet" / "config.json").is_file()


def shapes_pipeline(
    weights_dir: str | Path | None = None, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32
):
    """Load the Shapes pipeline offline from ``weights_dir`` (default: the weights shipped in the package)."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tokenizer import load_tokenizer

    d = Path(weights_dir or WEIGHTS_DIR)
    if not (d / "unet" / "config.json").exists():
        from qdiff.errors import QdiffError

        raise QdiffError(
            f"no Shapes weights in {d} (unet/config.json missing): reinstall qdiff, or train them with "
            "`python -m qdiff.models.shapes.train --stage all` (see docs/shapes-model.md)"
        )
    kw = {"local_files_only": True, "torch_dtype": torch_dtype, "use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(str(d / "unet"), **kw)
    with quiet_transformers_loading():
        text_encoder = CLIPTextModel.from_pretrained(str(d / "text_encoder"), **kw)
    vae = AutoencoderTiny.from_pretrained(str(d / "vae"), **kw)
    pipe = build_pipeline(unet, text_encoder, vae, load_tokenizer(d / "tokenizer"))
    return pipe.to(device)
