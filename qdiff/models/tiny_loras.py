"""Seeded LoRA files for the tiny builtin pipelines (tests and docs): any architecture, diffusers or kohya format.

:func:`write_tiny_lora` puts a random rank-``r`` LoRA on every Linear / Conv2d of the chosen components (the denoiser's
quantized layers and the ones qdiff keeps in float alike; attention and MLP layers of CLIP text encoders) and writes it
as diffusers writes LoRAs (``save_lora_weights`` of the pipeline class, adapter metadata in the header), or in kohya's
layout (``lora_unet_*`` / ``lora_te_*`` keys with ``lora_down`` / ``lora_up`` / ``alpha``; SD1.x UNets and text
encoders, names in diffusers' module order). ``B`` is random too (a trained LoRA's is), so the file changes images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(component: nn.Module, text: bool) -> list[str]:
    names = []
    for name, module in component.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if text and leaf in _TEXT_LAYERS and ".layers." in f".{name}":
            names.append(name)
        elif not text and isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "groups", 1) == 1:
            names.append(name)
    return names


def _factors(component: nn.Module, names: list[str], rank: int, gen: torch.Generator, std: float) -> dict:
    """``{name: (A, B)}``: A (r, K) / (r, C, kh, kw), B (N, r) / (N, r, 1, 1), float32."""
    out = {}
    for name in names:
        w = component.get_submodule(name).weight
        a_shape = (rank, *w.shape[1:])
        b_shape = (w.shape[0], rank, *([1] * (w.dim() - 2)))
        a = torch.randn(a_shape, generator=gen) / (w[0].numel() ** 0.5)
        out[name] = (a, torch.randn(b_shape, generator=gen) * std)
    return out


def write_tiny_lora(pipe, path: str | Path, *, components: tuple[str, ...] | None = None, rank: int = 4,
                    alpha: float = 8.0, seed: int = 0, std: float = 0.1, kohya: bool = False) -> Path:  # fmt: skip
    """Write a seeded LoRA for ``pipe`` to the ``.safetensors`` file ``path``; returns it.

    ``components``: pipeline attributes to adapt (default: the denoiser). ``alpha / rank`` scales the delta.
    """
    from qdiff.models.adapters import find_denoiser

    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    components = components or (find_denoiser(pipe)[0],)
    factors = {}
    for attr in components:
        module = getattr(pipe, attr)
        factors[attr] = _factors(module, _targets(module, attr.startswith("text_encoder")), rank, gen, std)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kohya:
        _write_kohya(factors, alpha, path)
    else:
        _write_diffusers(pipe, factors, rank, alpha, path)
    return path


def _write_diffusers(pipe, factors: dict, rank: int, alpha: float, path: Path) -> None:
    from peft import LoraConfig

    kwargs = {}
    for attr, layers in factors.items():
        state = {}
        for name, (a, b) in layers.items():
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
        kwargs[f"{attr}_lora_layers"] = state
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(layers))
        kwargs[f"{attr}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(path.parent, weight_name=path.name, **kwargs)


def _write_kohya(factors: dict, alpha: float, path: Path) -> None:
    from safetensors.torch import save_file

    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}
    state = {}
    for attr, layers in factors.items():
        for name, (a, b) in layers.items():
            key = prefixes[attr] + name.replace(".", "_")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a, b
            state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
