"""Architectures of the Shapes model: configs for the diffusers/transformers parts and the small scorer nets.

Tensor shapes: images (B, 3, 64, 64) in [-1, 1]; latents (B, 4, 16, 16) (VAE factor 4); text embeddings
(B, 20, 128).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import NUM_CLASSES
from .tokenizer import BOS, EOS, MODEL_MAX_LENGTH, build_vocab

LATENT_CHANNELS = 4
TEXT_DIM = 128

# AutoencoderTiny (plain convs, no GroupNorm): 3 levels -> factor 4, 64x64x3 <-> 16x16x4.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": (32, 32, 32),
    "decoder_block_out_channels": (48, 48, 48),
    "num_encoder_blocks": (0, 1, 2),
    "num_decoder_blocks": (2, 2, 0),
    "latent_channels": LATENT_CHANNELS,
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
    "scaling_factor": 1.0,  # set after training so scaled latents have unit std
    "shift_factor": 0.0,
}

# UNet2DConditionModel on 16x16 latents; cross-attention at 16x16 and 8x8 (and the 4x4 mid block).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "block_out_channels": (32, 64, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_DIM,
    "attention_head_dim": 4,  # diffusers' legacy name: number of heads
    "norm_num_groups": 8,
    "transformer_layers_per_block": 1,
    # Attention-pooled text embedding added to the time embedding (FiLM into every ResNet block): computed
    # inside the UNet from encoder_hidden_states, so StableDiffusionPipeline needs nothing extra.
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
}

# DDPM training schedule; sampling uses DDIM with trailing spacing on the same betas.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def text_encoder_config() -> dict[str, Any]:
    """CLIPTextConfig kwargs: hidden 128, 3 layers, 4 heads, ids matching the project tokenizer."""
    vocab, _ = build_vocab()
    return {
        "vocab_size": len(vocab),
        "hidden_size": TEXT_DIM,
        "intermediate_size": 4 * TEXT_DIM,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "projection_dim": TEXT_DIM,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS],
        "hidden_act": "quick_gelu",
    }


def clip_config() -> dict[str, Any]:
    """CLIPConfig kwargs for the scorer: ViT (64x64, patch 8) + text tower of the text encoder's size."""
    return {
        "text_config": text_encoder_config(),
        "vision_config": {
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "projection_dim": TEXT_DIM,
            "hidden_act": "quick_gelu",
        },
        "projection_dim": TEXT_DIM,
    }


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttributeNet(nn.Module):
    """CNN: image (B, 3, 64, 64) in [-1, 1] -> features (B, feat_dim) and one logit vector per attribute.

    ``heads`` gives the number of classes per head; the quality model uses one head of size 1.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 96, 128, 128),
        feat_dim: int = 128,
        heads: tuple[int, ...] = NUM_CLASSES,
    ) -> None:
        super().__init__()
        layers = [_conv(3, widths[0], 1)] + [_conv(a, b, 2) for a, b in zip(widths[:-1], widths[1:])]
        self.trunk = nn.Sequential(*layers)
        side = 64 // 2 ** (len(widths) - 1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * side * side, feat_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(feat_dim, n) for n in heads)
        self.config = {"widths": list(widths), "feat_dim": feat_dim, "heads": list(heads)}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) -> (B, feat_dim) penultimate features (used for Shapes-FID)."""
        return self.fc(self.trunk(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, 64, 64) -> list of logits, one (B, n_classes) per head."""
        f = self.features(x)
        return [h(f) for h in self.heads]


QUALITY_CONFIG: dict[str, Any] = {"widths": (16, 32, 48, 64), "feat_dim": 64, "heads": (1,)}


def count_params(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
