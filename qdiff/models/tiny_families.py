"""Tiny, seeded, random-weight instances of the real few-step model families (``builtin:tiny-<family>``).

Each builder uses the real family's pipeline and denoiser classes with the same layer names and module
types as the published model (checked against the real configs on the ``meta`` device in
tests/models/test_adapters.py), at toy widths, and the family's own scheduler:

==================  =====================================  ==========================================
builtin             real model                             what makes it that family
==================  =====================================  ==========================================
tiny-sdxl-turbo     stabilityai/sdxl-turbo                 SDXL UNet (text_time), EulerAncestral trailing
tiny-sd-turbo       stabilityai/sd-turbo                   SD2 UNet: linear proj_in/out, per-block heads,
                                                           OpenCLIP-style encoder (gelu); Euler trailing
tiny-lcm-dreamshaper SimianLuo/LCM_Dreamshaper_v7          SD1.5 UNet + time_cond_proj (guidance embedding),
                                                           LatentConsistencyModelPipeline, LCMScheduler
tiny-pcm-sdxl       SDXL + PCM LoRA (fused)                SDXL UNet, TCDScheduler (trailing)
tiny-pixart-lcm     PixArt-alpha/PixArt-LCM-XL-2-1024-MS   PixArt DiT + T5, LCMScheduler
tiny-flux-schnell   black-forest-labs/FLUX.1-schnell       FluxTransformer2DModel (double + single blocks),
                                                           CLIP + T5, FlowMatchEuler
==================  =====================================  ==========================================
"""

from __future__ import annotations

from qdiff.models.tiny import (
    _SD_BETAS,
    TINY_WORDS,
    _clip_text_encoder,
    _finish,
    _seeded,
    _vae,
    build_t5_tokenizer,
    make_scheduler,
    tiny_pixart_pipeline,
    tiny_sd_unet,
    tiny_sdxl_pipeline,
)
from qdiff.models.tokenizer import build_clip_tokenizer


def tiny_sdxl_turbo_pipeline(seed: int = 0):
    """SDXL-Turbo: the tiny SDXL pipeline with SDXL-Turbo's EulerAncestral (trailing) scheduler."""
    return tiny_sdxl_pipeline(seed, scheduler="euler_a")


def tiny_pcm_sdxl_pipeline(seed: int = 0):
    """PCM on SDXL (the LoRA fused into the UNet): the tiny SDXL pipeline with a trailing TCDScheduler."""
    from diffusers import TCDScheduler

    pipe = tiny_sdxl_pipeline(seed)
    pipe.scheduler = TCDScheduler(**_SD_BETAS, prediction_type="epsilon", timestep_spacing="trailing")
    return pipe


def tiny_pixart_lcm_pipeline(seed: int = 0):
    """PixArt-LCM: the tiny PixArt-alpha pipeline with an LCMScheduler."""
    return tiny_pixart_pipeline(seed, scheduler="lcm")


def tiny_sd_turbo_pipeline(seed: int = 0):
    """SD-Turbo (SD 2.1 architecture): linear proj_in/proj_out, per-block head dims, one OpenCLIP-style
    text encoder (gelu), trailing Euler, epsilon prediction (the noise schedule comes from the loaded model's own
    scheduler config for real weights; the recipe swaps only the update rule)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(TINY_WORDS)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with _seeded(seed + 1):
        text_encoder = _finish(CLIPTextModel(config))
    unet = tiny_sd_unet(seed, attention_head_dim=(2, 4), use_linear_projection=True)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler("euler"), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_lcm_dreamshaper_pipeline(seed: int = 0):
    """LCM-Dreamshaper-v7: SD1.5 UNet (conv proj_in/proj_out) with ``time_cond_proj_dim`` (the guidance
    scale enters as an embedding, no classifier-free batch) in a LatentConsistencyModelPipeline."""
    from diffusers import LatentConsistencyModelPipeline

    tokenizer = build_clip_tokenizer(TINY_WORDS)
    text_encoder = _clip_text_encoder(tokenizer, seed + 1)
    unet = tiny_sd_unet(seed, time_cond_proj_dim=16)
    pipe = LatentConsistencyModelPipeline(
        vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler("lcm"), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_schnell_pipeline(seed: int = 0):
    """FLUX.1-schnell: FluxTransformer2DModel (1 double-stream + 1 single-stream block), CLIP + T5 encoders,
    FlowMatchEulerDiscreteScheduler. T5 is 64 wide (bitsandbytes' CPU NF4 kernels need K >= 64). The 1-level
    VAE has one latent channel, packed 2x2 into 4 tokens'
    channels (the real one: 16 channels -> 64)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer, t5_tokenizer = build_clip_tokenizer(TINY_WORDS), build_t5_tokenizer()
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    with _seeded(seed + 3):
        t5 = _finish(T5EncoderModel(t5_config))
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        )  # fmt: skip
    with _seeded(seed + 2):
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
        )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_finish(vae), text_encoder=_clip_text_encoder(tokenizer, seed + 1),
        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=_finish(transformer),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0):
    """SD3 (medium): SD3Transformer2DModel (MM-DiT, the last block context-pre-only), two CLIP encoders with
    projection (their 32-wide outputs concatenated to 64 and zero-padded to T5's width) and a T5 encoder,
    FlowMatchEuler with shift 3.0 like the published scheduler config."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_clip_tokenizer(TINY_WORDS), build_clip_tokenizer(TINY_WORDS)
    t5_tokenizer = build_t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed + 1, projection_dim=32)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, seed + 3, projection_dim=32)
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    with _seeded(seed + 4):
        t5 = _finish(T5EncoderModel(t5_config))
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32,
        )  # fmt: skip
    with _seeded(seed + 2):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5305,
        )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=_finish(transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_finish(vae), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
