"""LoRA files fused into the float weights before calibrating and quantizing: the recipe key ``loras``.

Each entry names a local ``.safetensors`` LoRA (diffusers / PEFT format or one of the formats diffusers converts, e.g.
kohya), the strength it is fused at, and, once fused, its sha256 (written into the calibration folder's recipe and the
export manifest, so a later run can check that it fuses the same file)::

    loras:
      - {path: loras/pcm_sdxl_smallcfg_4step_converted.safetensors, scale: 1.0}

The command line takes the same as ``--lora PATH[:SCALE]`` (repeatable; it replaces the recipe's list).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from qdiff.config.sections import fail
from qdiff.errors import QdiffError

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LoraFile:
    """One LoRA to fuse: ``path`` (relative paths: from the working directory), ``scale`` (``fuse_lora``'s
    ``lora_scale``: the delta is multiplied by it), ``sha256`` (checked when set; filled in when fused)."""

    path: str = ""
    scale: float = 1.0
    sha256: str | None = None

    def __post_init__(self) -> None:
        self.validate("loras[]")

    def validate(self, where: str) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise fail(f"{where}.path", "must be a non-empty path to a .safetensors LoRA file")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise fail(f"{where}.scale", f"must be a finite number, got {self.scale!r}")
        if self.sha256 is not None and not (isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256)):
            raise fail(f"{where}.sha256", "must be 64 lowercase hex digits (or absent)")

    def label(self) -> str:
        """``PATH:SCALE`` as the command line writes it."""
        return f"{self.path}:{self.scale:g}"


def parse_lora(text: str) -> LoraFile:
    """``PATH`` or ``PATH:SCALE`` (the last ``:`` followed by a number) -> :class:`LoraFile`."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            if path.lower().endswith(".safetensors"):  # PATH:SCALE, the scale not a number
                why = f"the scale {tail!r} is not a number (PATH:SCALE, e.g. x.safetensors:0.8)"
                raise QdiffError(f"--lora {text!r}: {why}") from None
            path, scale = text, 1.0  # a colon inside the path
    else:
        path, scale = text, 1.0
    if not path:
        raise QdiffError(f"--lora {text!r}: expected PATH or PATH:SCALE")
    if not math.isfinite(scale):
        raise QdiffError(f"--lora {text!r}: the scale must be a finite number")
    return LoraFile(path=path, scale=scale)


def as_lora_files(loras) -> tuple[LoraFile, ...]:
    """LoRA entries given to the API: ``LoraFile``s, ``"PATH[:SCALE]"`` strings or ``(path, scale)`` pairs."""
    out: list[LoraFile] = []
    for item in loras:
        if isinstance(item, LoraFile):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_lora(item))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(LoraFile(path=str(item[0]), scale=item[1]))
        else:
            raise QdiffError(f"loras: expected 'PATH[:SCALE]' strings or (path, scale) pairs, got {item!r}")
    return tuple(out)
