"""Save and load quantized text encoders inside an export (the manifest's optional ``text_encoders`` entry).

A W8A8 CLIP encoder is written as ``<attr>/config.json`` + ``<attr>/qdiff.safetensors`` and listed with its class,
mode, weights file and layer table; a bitsandbytes T5 is written by transformers (safetensors with the quantization
config in ``config.json``) and listed with its mode.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qdiff.config.layer import LayerQuant
from qdiff.errors import QdiffError
from qdiff.export.checks import inside, json_object
from qdiff.export.manifest import WEIGHTS_FILE
from qdiff.quant.text_encoders import CLIP_CLASSES, TEXT_ENCODER_ATTRS, require_bnb, text_encoder_mode
from qdiff.quant.transform import build_frozen_shells, quantized_layers


def save_text_encoder(encoder: nn.Module, folder: Path, attr: str) -> dict:
    """Write one quantized text encoder under ``folder`` (the export's ``<attr>/``); returns its manifest entry."""
    from safetensors.torch import save_file

    mode = text_encoder_mode(encoder)
    entry = {"class": type(encoder).__name__, "mode": mode}
    if mode != "w8a8":
        encoder.save_pretrained(folder, safe_serialization=True)
        return entry
    folder.mkdir(parents=True, exist_ok=True)
    encoder.config.to_json_file(str(folder / "config.json"))
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "qdiff": "1"})
    layers = quantized_layers(encoder)
    entry["weights"] = f"{attr}/{WEIGHTS_FILE}"
    entry["layers"] = {n: {"quant": m.qcfg.to_dict(), "bos": m.bos_mode} for n, m in layers.items()}
    return entry


def load_text_encoders(folder: Path, manifest: dict) -> dict[str, nn.Module]:
    """Rebuild the W8A8 text encoders of an export (attr -> module); bitsandbytes ones load with the pipeline."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    out: dict[str, nn.Module] = {}
    for attr, entry in (manifest.get("text_encoders") or {}).items():
        where = f"{folder / 'qdiff.json'}: text_encoders.{attr}"
        if attr not in TEXT_ENCODER_ATTRS or not isinstance(entry, dict):
            raise QdiffError(f"{where}: not a text-encoder entry")
        if entry.get("mode") in ("nf4", "int8"):
            require_bnb(f"{where} ({entry['mode']})")
            continue
        if entry.get("mode") != "w8a8" or entry.get("class") not in CLIP_CLASSES:
            raise QdiffError(f"{where}: unsupported mode/class {entry.get('mode')!r}/{entry.get('class')!r}")
        import transformers

        cls = getattr(transformers, entry["class"])
        weights = inside(folder, entry.get("weights"), f"{where}.weights")  # read_manifest checked it too
        config_path = folder / attr / "config.json"
        try:
            config = cls.config_class.from_dict(json_object(config_path, config_path.read_bytes()))
            with init_empty_weights(include_buffers=False):
                encoder = cls(config)
            specs = {n: LayerQuant.from_dict(e["quant"]) for n, e in entry["layers"].items()}
            build_frozen_shells(encoder, specs, {n: e["bos"] for n, e in entry["layers"].items()})
            tensors = load_file(str(weights), device="cpu")
            encoder.load_state_dict(tensors, strict=True, assign=True)
        except QdiffError:
            raise
        except Exception as exc:
            raise QdiffError(f"{where}: cannot rebuild the quantized encoder ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None  # fmt: skip
        leftover = [n for n, t in list(encoder.named_parameters()) + list(encoder.named_buffers()) if t.is_meta]
        if leftover:
            raise QdiffError(f"{where}: tensor {leftover[0]!r} was not restored")
        out[attr] = encoder.eval()
    return out
