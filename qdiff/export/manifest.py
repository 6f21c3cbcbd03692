"""The export manifest ``qdiff.json``: format version, recipe, plan, per-layer bits and file hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qdiff.errors import QdiffError

MANIFEST = "qdiff.json"
FORMAT = "qdiff-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "qdiff.safetensors"
# Anything that could execute code when loaded is refused outright.
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".joblib")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest itself, keyed by POSIX relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and check ``folder/qdiff.json`` (format and version); errors name the file."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise QdiffError(f"export folder {folder} not found")
    if not path.is_file():
        raise QdiffError(f"{folder} is not a qdiff export (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QdiffError(f"{path}: not valid JSON (line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QdiffError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise QdiffError(f'{path}: not a qdiff export manifest (missing "format": "{FORMAT}")')
    if data.get("format_version") != FORMAT_VERSION:
        raise QdiffError(
            f"{path}: format version {data.get('format_version')!r} is not supported "
            f"(this qdiff reads {FORMAT_VERSION})"
        )
    for key in ("denoiser", "layers", "files"):
        if not isinstance(data.get(key), dict):
            raise QdiffError(f"{path}: field {key!r} missing or not a mapping")
    return data


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse pickle-capable files, missing or unlisted files, and any sha256 mismatch; errors name the file."""
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in FORBIDDEN_SUFFIXES:
            raise QdiffError(f"{p}: refusing to load a {p.suffix} file (qdiff loads only safetensors and JSON)")
    listed: dict[str, str] = manifest["files"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        raise QdiffError(f"{folder / extra[0]}: file is not listed in {MANIFEST} (added after export?)")
    for rel, digest in listed.items():
        path = folder / rel
        if not path.is_file():
            raise QdiffError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != digest:
            raise QdiffError(f"{path}: sha256 mismatch with {MANIFEST} (file was modified or corrupted)")
