"""Optional text-encoder quantization (recipe section ``text_encoders``); :mod:`qdiff.export.text_encoders` saves them.

* CLIP encoders (``clip: w8a8``): every ``nn.Linear`` of the transformer encoder (q/k/v/out_proj, fc1, fc2)
  becomes a :class:`~qdiff.quant.bos.BOSQuantLinear` with per-channel W8 and dynamic per-token A8. Token 0
  (BOS, the massive-activation token of CLIP) never enters the activation quantizer: its output row is computed
  in full precision. With a causal encoder token 0 attends only to itself, so its input to every layer is the
  same for every prompt; a probe on two prompts checks that and then keeps one fp32 row per layer (``cached``),
  else the float weight (``per_call``). Embeddings, layer norms and ``text_projection`` stay float.
* T5 encoders (``t5: nf4 | int8``): bitsandbytes weight-only ``Linear4bit`` (NF4) / ``Linear8bitLt`` through
  transformers' ``BitsAndBytesConfig``; bitsandbytes is the optional extra ``qdiff[bnb]``, imported lazily.

Export: a W8A8 CLIP encoder is written as ``<attr>/config.json`` + ``<attr>/qdiff.safetensors`` and listed in the
manifest's ``text_encoders`` entry (class, mode, weights file, layer table); a bitsandbytes T5 is written by
transformers (safetensors with the quantization config in ``config.json``) and listed with its mode.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

from qdiff.config.layer import LayerQuant
from qdiff.errors import QdiffError
from qdiff.quant.transform import apply_specs, quantized_layers
from qdiff.utils.lazy_imports import import_bitsandbytes

TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")
CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
T5_CLASSES = ("T5EncoderModel",)
W8A8 = LayerQuant(w_bits=8, granularity="channel", method="minmax", a_bits=8, a_mode="dynamic")
PROBE_PROMPTS = ("", "a photo of a red cat sitting on a house at night")


def clip_layers(encoder: nn.Module) -> list[str]:
    """Names of the encoder-block Linear layers of a CLIP text model (``text_model.encoder.layers.*``)."""
    return [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and ".encoder.layers." in f".{n}"]


@torch.no_grad()
def _token0_inputs(encoder: nn.Module, names: list[str], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token-0 input row of each layer, (B, K), from one forward pass."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        encoder.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen.__setitem__(n, args[0][:, 0].detach().float().clone())
        )
        for n in names
    ]
    try:
        encoder(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def quantize_clip_w8a8(encoder: nn.Module, tokenizer, rtol: float = 1e-5) -> str:
    """Quantize a CLIP text encoder in place (frozen, BOS-aware); returns the BOS mode used."""
    names = clip_layers(encoder)
    if not names:
        raise QdiffError(f"text encoder {type(encoder).__name__}: no encoder Linear layers to quantize")
    device = next(encoder.parameters()).device
    ids = tokenizer(list(PROBE_PROMPTS), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)  # fmt: skip
    rows = _token0_inputs(encoder, names, ids)
    invariant = all((r[1:] - r[:1]).abs().max() <= rtol * max(float(r[:1].abs().max()), 1e-12) for r in rows.values())
    mode = "cached" if invariant else "per_call"
    layers = apply_specs(encoder, {n: W8A8 for n in names}, {n: mode for n in names})
    for name, layer in layers.items():
        layer.set_bos(mode, rows[name][0] if mode == "cached" else None)
        layer.freeze()
    return mode


def require_bnb(what: str) -> None:
    try:
        import_bitsandbytes()  # without its optional CPU-kernel notice
    except ImportError:
        raise QdiffError(f"{what} needs bitsandbytes, an optional dependency: pip install 'qdiff[bnb]'") from None


def quantize_t5_bnb(encoder: nn.Module, mode: str) -> nn.Module:
    """A bitsandbytes NF4 / int8 weight-only copy of a T5 encoder (reloaded through transformers)."""
    require_bnb(f"text_encoders.t5: {mode}")
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    device = next(encoder.parameters()).device
    with tempfile.TemporaryDirectory(prefix="qdiff-t5-") as tmp:
        encoder.save_pretrained(tmp, safe_serialization=True)
        try:
            return type(encoder).from_pretrained(tmp, quantization_config=config, device_map=str(device)).eval()
        except Exception as exc:  # an unsupported device or bitsandbytes build
            text = " ".join(str(exc).split())[:200]
            raise QdiffError(f"text_encoders.t5: bitsandbytes {mode} is not available on {device}: {text}") from exc


def quantize_text_encoders(pipe, cfg) -> dict[str, str]:
    """Apply ``cfg`` (a :class:`qdiff.config.recipe.TextEncoderConfig`) to ``pipe``'s text encoders; attr -> mode."""
    done: dict[str, str] = {}
    for attr in TEXT_ENCODER_ATTRS:
        encoder = getattr(pipe, attr, None)
        cls = type(encoder).__name__
        if cls in CLIP_CLASSES and cfg.clip == "w8a8":
            tokenizer = getattr(pipe, attr.replace("text_encoder", "tokenizer"))
            quantize_clip_w8a8(encoder, tokenizer)
            done[attr] = "w8a8"
        elif cls in T5_CLASSES and cfg.t5 != "none":
            pipe.register_modules(**{attr: quantize_t5_bnb(encoder, cfg.t5)})
            done[attr] = cfg.t5
    return done


def text_encoder_mode(encoder: nn.Module) -> str | None:
    """``w8a8`` / ``nf4`` / ``int8`` for a quantized text encoder, else None."""
    if quantized_layers(encoder):
        return "w8a8"
    qc = getattr(getattr(encoder, "config", None), "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("load_in_4bit"):
        return qc.get("bnb_4bit_quant_type", "nf4")
    return "int8" if qc.get("load_in_8bit") else None
