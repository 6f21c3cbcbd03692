"""LoRA files on disk: safetensors only (never pickle), hashed, their target components read from the header.

A LoRA named by a recipe or ``--lora`` must be a local ``.safetensors`` file that safetensors can open; anything
else (``.bin``, ``.pt``, ``.ckpt``, a folder, a missing file) is a one-line :class:`~qdiff.errors.QdiffError`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qdiff.config.loras import LoraFile
from qdiff.errors import QdiffError
from qdiff.utils.hashing import sha256_file

# key prefixes of the text-encoder parts of a LoRA: diffusers' names and kohya's (lora_te_, lora_te1_, lora_te2_)
_TEXT_PREFIXES = ("text_encoder", "lora_te")


def checked_path(lora: LoraFile) -> Path:
    """The LoRA's file, after checking that it is a readable safetensors file (the header is parsed, no tensor)."""
    return checked_keys(lora)[0]


def checked_keys(lora: LoraFile) -> tuple[Path, list[str]]:
    """:func:`checked_path` and the tensor names its header holds (the header read once)."""
    path = Path(lora.path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise QdiffError(f"LoRA {lora.path}: only .safetensors LoRA files are loaded (never pickle: .bin/.pt/.ckpt)")
    if not path.is_file():
        raise QdiffError(
            f"LoRA {lora.path}: file not found (a LoRA must be a local .safetensors file: the recipe's "
            "loras or --lora PATH[:SCALE] name it; nothing is downloaded)"
        )
    return path, keys(path)


def keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file, from its header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise QdiffError(
            f"LoRA {path}: not a readable safetensors file ({' '.join(str(exc).split())[:120]})"
        ) from None


def resolve(loras: tuple[LoraFile, ...]) -> tuple[LoraFile, ...]:
    """Each LoRA checked (:func:`checked_path`) with its sha256 filled in; a recorded sha256 that differs from the
    file's is refused (the file changed since the calibration or export that recorded it)."""
    out = []
    for lora in loras:
        digest = sha256_file(checked_path(lora))
        if lora.sha256 is not None and lora.sha256 != digest:
            raise QdiffError(f"LoRA {lora.path}: sha256 {digest[:12]}... differs from the recorded "
                             f"{lora.sha256[:12]}... (the file changed since it was recorded)")  # fmt: skip
        out.append(dataclasses.replace(lora, sha256=digest))
    return tuple(out)


def has_text_encoder_part(lora: LoraFile) -> bool:
    """Whether the LoRA also changes a text encoder (header keys only)."""
    return any(k.startswith(_TEXT_PREFIXES) for k in checked_keys(lora)[1])
