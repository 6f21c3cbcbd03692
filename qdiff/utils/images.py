"""Image helpers: PIL/tensor conversion, side-by-side grids and atomic PNG writes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qdiff.errors import QdiffError
from qdiff.utils.perms import usual_mkstemp


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float32 (B, 3, H, W) in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def hstack(images: Sequence[Image.Image]) -> Image.Image:
    """Images side by side (same height)."""
    width = sum(im.width for im in images)
    out = Image.new("RGB", (width, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return out


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = usual_mkstemp(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise QdiffError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
