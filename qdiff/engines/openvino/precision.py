"""Which precision each OpenVINO component's float parts run in (``INFERENCE_PRECISION_HINT``).

Quantized layers run in int8 whatever this says; it decides the rest (attention, norms, float-kept layers, the text
encoders, the VAE). Measured on the Shapes model (``scripts/openvino_precision.py``, docs/openvino.md): with the
UNet's sinusoidal timestep embeddings kept in f32 (:mod:`qdiff.engines.openvino.components`), bf16 float parts cost
the float model SSIM 0.9997 (UNet) / 1.0000 (text encoder) / 0.9998 (VAE decoder) against all-f32, and a quantized
export nothing beyond the activation-rounding floor its all-f32 run already shows against torch; and bf16 is faster
(the Shapes pipeline with an f32 text encoder was 10% slower per image than NNCF's all-bf16 one at the same UNet
time). Hence bf16 for every component. ``bf16`` runs as f32 on CPUs without native bf16 (AVX512-BF16 / AMX), where
the plugin would emulate it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from qdiff.errors import QdiffError

PRECISIONS = ("f32", "bf16")
DEFAULTS: dict[str, str] = {
    "unet": "bf16",
    "text_encoder": "bf16",
    "text_encoder_2": "bf16",
    "vae_decoder": "bf16",
    "vae_encoder": "bf16",
}


def effective(precision: str, bf16_native: bool) -> str:
    """The hint the CPU plugin gets: ``bf16`` only where the CPU computes it natively."""
    return precision if precision != "bf16" or bf16_native else "f32"


def resolve_precisions(precision: str | Mapping[str, str] | None, folders: Iterable[str],
                       base: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """``{component: precision}`` for ``folders``: ``base`` (default: :data:`DEFAULTS`; a loaded folder: what it
    recorded), overridden by one value for all or by a mapping (the components it names; the others keep ``base``)."""
    folders = list(folders)
    chosen = {f: (base or DEFAULTS).get(f, "f32") for f in folders}
    if precision is None:
        return chosen
    if isinstance(precision, str):
        return {f: _check(precision, "precision") for f in folders}
    for key, value in precision.items():
        if key not in chosen:
            raise QdiffError(f"precision: no component {key!r} (components: {', '.join(folders)})")
        chosen[key] = _check(value, f"precision.{key}")
    return chosen


def parse_precision(text: str) -> str | dict[str, str]:
    """``--precision`` as the CLI takes it: ``f32``, ``bf16`` or ``unet=bf16,vae_decoder=f32``."""
    if "=" not in text:
        return _check(text.strip(), "--precision")
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QdiffError(f"--precision: expected COMPONENT=PRECISION, got {item!r}")
        out[key.strip()] = _check(value.strip(), f"--precision {key.strip()}")
    return out


def _check(value: str, where: str) -> str:
    if value not in PRECISIONS:
        raise QdiffError(f"{where}: {value!r} is not one of {', '.join(PRECISIONS)}")
    return value
