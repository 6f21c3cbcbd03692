"""Calibration prompt sets: bundled by name (``coco``, ``shapes``) or a text file, one prompt per line."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from qdiff.errors import QdiffError


def bundled_prompt_sets() -> list[str]:
    return sorted(p.name[:-4] for p in files("qdiff.calibration_prompts").iterdir() if p.name.endswith(".txt"))


def load_prompts(name_or_path: str | Path, n: int | None = None) -> list[str]:
    """The first ``n`` prompts (all when ``None``) of a set or file; blank lines and ``#`` comments skipped."""
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    else:
        resource = files("qdiff.calibration_prompts") / f"{name_or_path}.txt"
        if not resource.is_file():
            sets = ", ".join(bundled_prompt_sets())
            raise QdiffError(f"prompts {str(name_or_path)!r} not found: not a file and not a bundled set ({sets})")
        text = resource.read_text()
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise QdiffError(f"prompts {name_or_path}: no prompts in the file")
    return prompts if n is None else prompts[:n]
