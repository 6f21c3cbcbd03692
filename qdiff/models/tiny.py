"""Seeded, random-weight, tiny text-to-image pipelines built entirely offline.

They have the real architectures (a UNet2DConditionModel with cross-attention, an SDXL-style UNet with
two text encoders and ``text_time`` micro-conditioning, a PixArt-alpha DiT with a T5 encoder) at toy
widths, so that everything in qdiff (layer discovery, calibration, quantization, export) can be tested
on CPU in well under a second per pipeline. The same seed always gives bit-identical weights.

All configs are written here; nothing is read from the model hub.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from qdiff.errors import QdiffError
from qdiff.models.tokenizer import build_clip_tokenizer

# Whole-word tokens for the tiny tokenizers, so that ordinary prompts give short, realistic token
# sequences (other words fall back to letters).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by", "photo", "picture", "painting", "drawing",
    "portrait", "cat", "dog", "bird", "horse", "car", "house", "tree", "flower", "mountain", "river", "city",
    "street", "forest", "beach", "sky", "sunset", "red", "blue", "green", "yellow", "white", "black", "small",
    "large", "old", "young", "man", "woman", "child", "astronaut", "riding", "sitting", "standing", "high",
    "quality", "detailed", "realistic", "style", "art", "light", "night", "day", "water", "snow",
)  # fmt: skip

# Timestep / noise schedule of Stable Diffusion (and SDXL) and of PixArt-alpha.
_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_PIXART_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}

SCHEDULERS: tuple[str, ...] = ("lcm", "euler", "euler_a", "ddim")


def make_scheduler(name: str, betas: Mapping | None = None):
    """A few-step scheduler by short name: ``lcm``, ``euler`` (trailing), ``euler_a`` (trailing), ``ddim``."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler

    betas = dict(_SD_BETAS if betas is None else betas)
    common = {**betas, "prediction_type": "epsilon"}
    if name == "lcm":
        return LCMScheduler(
            **common, original_inference_steps=50, clip_sample=False, set_alpha_to_one=True,
            timestep_spacing="leading", steps_offset=1, timestep_scaling=10.0,
        )  # fmt: skip
    if name == "euler":
        return EulerDiscreteScheduler(
            **common, timestep_spacing="trailing", steps_offset=1, interpolation_type="linear"
        )
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing", steps_offset=1)
    if name == "ddim":
        return DDIMScheduler(
            **common, timestep_spacing="trailing", steps_offset=1, clip_sample=False, set_alpha_to_one=False
        )
    raise QdiffError(f"unknown tiny scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for module initialisation without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _finish(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval()


def _clip_text_encoder(tokenizer, seed: int, hidden: int = 32, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection_dim is not None else CLIPTextModel
    with _seeded(seed):
        return _finish(cls(config))


def _vae(seed: int, block_out_channels: tuple[int, ...] = (32, 64), norm_num_groups: int = 8, scaling=0.18215):
    """A tiny AutoencoderKL; each GroupNorm sees ``channels / norm_num_groups >= 4`` channels."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=norm_num_groups,
            sample_size=64,
            scaling_factor=scaling,
        )
    return _finish(vae)


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "lcm"):
    """A Stable-Diffusion-1.x-shaped pipeline (UNet with conv proj_in/proj_out, one CLIP text encoder).

    The VAE downsamples by 2, so a 64x64 image has 32x32 latents; the UNet's ``sample_size`` is 32, so
    64x64 is also the default resolution.
    """
    from diffusers import StableDiffusionPipeline

    sched = make_scheduler(scheduler)
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    text_encoder = _clip_text_encoder(tokenizer, seed + 1)
    unet = tiny_sd_unet(seed)
    vae = _vae(seed + 2)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_unet(seed: int = 0, **overrides):
    """The SD1.5-shaped tiny UNet (2 levels, 32/64 channels, cross-attention 32) shared by the SD-family fixtures;
    ``overrides`` change single config fields (e.g. SD2's linear projections, LCM's ``time_cond_proj_dim``)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8, use_linear_projection=False,
    )  # fmt: skip
    with _seeded(seed):
        unet = UNet2DConditionModel(**{**config, **overrides})
    return _finish(unet)


def tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "euler"):
    """An SDXL-shaped pipeline: two CLIP encoders (hidden 32 each, concatenated to 64), linear
    proj_in/proj_out, ``text_time`` added conditioning, trailing Euler. Runs with ``guidance_scale=0``.
    """
    from diffusers import UNet2DConditionModel

    time_dim, projection_dim = 8, 32
    text = _sdxl_text_encoders(seed, cross_attention_dim=64, pooled_dim=projection_dim)
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            norm_num_groups=8,
            cross_attention_dim=text["text_encoder"].config.hidden_size + text["text_encoder_2"].config.hidden_size,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 micro-conditions (original size, crop top-left, target size) + the pooled text embedding.
            projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        )
    return _sdxl_pipeline(seed, scheduler, text, _finish(unet))


def tiny_sdxl_parts_for(unet_config: Mapping, seed: int = 0, scheduler: str = "euler"):
    """The tiny SDXL pipeline's text encoders, tokenizers, VAE and scheduler, sized to drive a UNet with
    ``unet_config`` (e.g. the published SDXL config, ``qdiff.models.published.SDXL_UNET``), with no UNet.

    The two encoders' hidden sizes add up to ``cross_attention_dim``; the second is as wide as its projection, the
    pooled embedding, which is what ``projection_class_embeddings_input_dim`` leaves after the 6 time ids of
    ``addition_time_embed_dim`` each (SDXL: 2048 = 768 + 1280, 2816 = 1280 + 6 * 256).
    """
    try:
        cross = int(unet_config["cross_attention_dim"])
        pooled = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(
            unet_config["addition_time_embed_dim"]
        )
        channels = (int(unet_config["in_channels"]), int(unet_config["out_channels"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise QdiffError(f"not an SDXL UNet config (text_time conditioning): {exc!r}") from None
    first = cross - pooled
    if min(first, pooled) <= 0 or first % 4 or pooled % 4 or channels != (4, 4):
        raise QdiffError(
            f"no tiny SDXL encoders fit this UNet: cross_attention_dim {cross} and pooled width {pooled} must leave "
            f"two positive widths divisible by 4, and the latents must have 4 channels (got {channels})"
        )
    return _sdxl_pipeline(seed, scheduler, _sdxl_text_encoders(seed, cross, pooled), None)


def _sdxl_text_encoders(seed: int, cross_attention_dim: int, pooled_dim: int) -> dict:
    """Two tiny CLIP encoders (and tokenizers) whose hidden sizes add up to ``cross_attention_dim``; the second is
    ``pooled_dim`` wide and projects to ``pooled_dim``."""
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    tokenizer_2 = build_clip_tokenizer(TINY_WORDS)
    return {
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "text_encoder": _clip_text_encoder(tokenizer, seed + 1, hidden=cross_attention_dim - pooled_dim),
        "text_encoder_2": _clip_text_encoder(tokenizer_2, seed + 3, hidden=pooled_dim, projection_dim=pooled_dim),
    }


def _sdxl_pipeline(seed: int, scheduler: str, text: dict, unet):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 2, scaling=0.13025),
        **text,
        unet=unet,
        scheduler=make_scheduler(scheduler),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_t5_tokenizer(extra_words=TINY_WORDS, model_max_length: int = 120):
    """A small Unigram ``T5Tokenizer`` built in memory: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then
    printable ASCII pieces (with and without the ``▁`` word-start marker) and whole words."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    seen = {p for p, _ in pieces}
    for word in extra_words:
        piece = "\u2581" + word.lower()
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -2.0))
    for code in range(ord("!"), ord("~") + 1):
        for piece in (chr(code), "\u2581" + chr(code)):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -8.0))
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = int(model_max_length)
    return tokenizer


def tiny_pixart_pipeline(seed: int = 0, scheduler: str = "lcm"):
    """A PixArt-alpha-shaped pipeline (PixArtTransformer2DModel + a 2-layer T5 encoder).

    PixArtAlphaPipeline bins resolutions by default (``use_resolution_binning=True``) and only accepts a
    transformer ``sample_size`` of 32, 64 or 128; with 32 a 64x64 request is computed at 256x256 (the
    256 aspect-ratio bin) and resized back to 64x64. The VAE therefore downsamples by 8, like the real
    one, giving 32x32 latents and 256 image tokens (patch size 2).
    """
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    sched = make_scheduler(scheduler, _PIXART_BETAS)
    tokenizer = build_t5_tokenizer()
    t5_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed + 1):
        text_encoder = _finish(T5EncoderModel(t5_config))
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            cross_attention_dim=32,
            sample_size=32,
            patch_size=2,
            caption_channels=t5_config.d_model,
            norm_num_groups=8,
        )
    vae = _vae(seed + 2, block_out_channels=(8, 8, 16, 16), norm_num_groups=2)
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=_finish(transformer), scheduler=sched
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
