"""What the loader refuses before it reads anything: paths that leave the export, symbolic links, special files,
and JSON documents of the wrong shape (docs/export-format.md, "What qdiff.load refuses").

Symbolic links: an export holds plain files (``qdiff.save`` and the streaming quantizer write no links), so a link
anywhere in it is refused, whether it points outside or inside. The one exception is how ``huggingface_hub``
stores a download: in ``.../models--ORG--NAME/snapshots/REV/`` every file is a link to a regular file in that
repository's own ``blobs/`` folder; such a link is followed, any other is not.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from qdiff.errors import QdiffError

SHA256 = re.compile(r"[0-9a-f]{64}")
HUB_REPO_PREFIX = "models--"  # huggingface_hub's cache: <cache>/models--ORG--NAME/{blobs,snapshots/REV}


def kind(value: Any) -> str:
    """A JSON value's type in words, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def inside(folder: Path, rel: Any, where: str) -> Path:
    """``folder / rel`` for a path the manifest names: a non-empty relative POSIX path of plain names (no ``..``,
    ``.``, empty part, backslash or drive); else a one-line QdiffError naming ``where``."""
    if not isinstance(rel, str) or not rel:
        raise QdiffError(f"{where}: expected a relative path inside the export, got {kind(rel)}")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\x00" in rel or ":" in parts[0]:
        raise QdiffError(f"{where}: {rel!r} is not a path inside the export (absolute, '..' or not normalized)")
    return folder.joinpath(*parts)


def hub_blob(folder: Path, link: Path) -> bool:
    """Whether ``link`` is a huggingface_hub cache entry: ``folder`` is ``.../models--ORG--NAME/snapshots/REV`` and
    the link resolves to a regular file directly in that repository's own (real, unlinked) ``blobs/`` folder."""
    try:
        real = folder.resolve()
        blobs = real.parent.parent / "blobs"
        if real.parent.name != "snapshots" or not real.parent.parent.name.startswith(HUB_REPO_PREFIX):
            return False
        target = link.resolve()
        return not blobs.is_symlink() and target.parent == blobs and target.is_file() and not target.is_symlink()
    except (OSError, RuntimeError):  # a link loop
        return False


def refuse_link(folder: Path, link: Path) -> None:
    """Raise for a symbolic link that is not a huggingface_hub cache entry, saying where it points."""
    if hub_blob(folder, link):
        return
    target = Path(os.path.realpath(link))
    where = "inside the export" if target.is_relative_to(folder.resolve()) else f"to {target}, outside the export"
    raise QdiffError(f"{link}: symbolic link {where}; refused (an export holds plain files only)")


def export_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by POSIX relative path, found without following any link and without reading a
    byte: symbolic links (file or folder; see the module docstring), FIFOs, sockets and devices are refused."""
    out: dict[str, Path] = {}
    pending = [(folder, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise QdiffError(f"{directory}: cannot list ({exc})") from None
        for entry in entries:
            path, rel = Path(entry.path), prefix + entry.name
            if entry.is_symlink():
                refuse_link(folder, path)
                out[rel] = path  # a hub cache blob
            elif entry.is_dir(follow_symlinks=False):
                pending.append((path, rel + "/"))
            elif entry.is_file(follow_symlinks=False):
                out[rel] = path
            else:
                raise QdiffError(f"{path}: not a regular file (FIFO, socket or device); refused")
    return out


def parse_json(path: Path, data: bytes | str) -> Any:
    """Parse ``data`` (the bytes of ``path``) as JSON; a one-line QdiffError naming the file otherwise."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise QdiffError(f"{path}: not valid JSON (line {exc.lineno})") from None
    except ValueError as exc:  # not UTF-8
        raise QdiffError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:120]})") from None


def json_object(path: Path, data: bytes | str) -> dict[str, Any]:
    """Parse ``data`` (the bytes of ``path``) as a JSON object; a one-line QdiffError naming the file otherwise."""
    doc = parse_json(path, data)
    if not isinstance(doc, dict):
        raise QdiffError(f"{path}: expected a JSON object, got {kind(doc)}")
    return doc


def _optional(data: dict[str, Any], key: str, types: tuple[type, ...], where: str, what: str) -> None:
    if data.get(key) is not None and not isinstance(data[key], types):
        raise QdiffError(f"{where}: {key} must be {what} or null, got {kind(data[key])}")


def check_manifest(folder: Path, data: dict[str, Any], where: Path) -> None:
    """The types of every field of the manifest ``where`` the loader uses, and every path it names kept inside
    ``folder``: pure data checks, before any other file is touched. Errors name the manifest and the key."""
    for key in ("denoiser", "layers", "files"):
        if not isinstance(data.get(key), dict):
            raise QdiffError(f"{where}: field {key!r} missing or not a mapping (got {kind(data.get(key))})")
    for key, what in (("recipe", "an object"), ("plan", "an object"), ("schedule", "an object")):
        _optional(data, key, (dict,), where, what)
    for key in ("qdiff_version", "base_model", "pipeline_class", "torch_dtype"):
        _optional(data, key, (str,), where, "a string")
    _optional(data, "denoiser_only", (bool,), where, "true/false")
    if data.get("torch_dtype") is not None:
        from qdiff.config.dtypes import as_torch_dtype

        try:
            as_torch_dtype(data["torch_dtype"])
        except QdiffError as exc:
            raise QdiffError(f"{where}: torch_dtype: {exc}") from None
    _optional(data, "text_encoders", (dict,), where, "an object")
    _check_denoiser(folder, data["denoiser"], f"{where}: denoiser")
    for rel, digest in data["files"].items():
        inside(folder, rel, f"{where}: files")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            got = repr(digest)[:70] if isinstance(digest, str) else kind(digest)
            raise QdiffError(f"{where}: files[{rel!r}]: expected a sha256 (64 lowercase hex digits), got {got}")
    for name, entry in data["layers"].items():
        _check_layer(entry, f"{where}: layers.{name}")
    for attr, entry in (data.get("text_encoders") or {}).items():
        _check_text_encoder(folder, entry, data["files"], f"{where}: text_encoders.{attr}")


def _check_denoiser(folder: Path, den: dict[str, Any], where: str) -> None:
    for key in ("attr", "class", "weights"):
        if not isinstance(den.get(key), str):
            raise QdiffError(f"{where}.{key}: expected a string, got {kind(den.get(key))}")
    _optional(den, "family", (str,), where, "a string")
    if "/" in den["attr"]:
        raise QdiffError(f"{where}.attr: {den['attr']!r} is not a pipeline attribute")
    inside(folder, den["attr"], f"{where}.attr")
    inside(folder, den["weights"], f"{where}.weights")


def _check_layer(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("quant"), dict):
        raise QdiffError(f"{where}: expected a mapping with a 'quant' layer spec, got {kind(entry)}")
    shape = entry.get("weight_shape", [])
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise QdiffError(f"{where}.weight_shape: expected a list of sizes, got {shape!r:.80}")


def _check_text_encoder(folder: Path, entry: Any, files: dict[str, Any], where: str) -> None:
    if not isinstance(entry, dict):
        raise QdiffError(f"{where}: expected an object, got {kind(entry)}")
    for key in ("class", "mode"):
        if not isinstance(entry.get(key), str):
            raise QdiffError(f"{where}.{key}: expected a string, got {kind(entry.get(key))}")
    if "weights" in entry:
        inside(folder, entry["weights"], f"{where}.weights")
        if entry["weights"] not in files:
            raise QdiffError(f"{where}.weights: {entry['weights']!r} is not listed in files")
    layers = entry.get("layers", {})
    if not isinstance(layers, dict):
        raise QdiffError(f"{where}.layers: expected an object, got {kind(layers)}")
    for name, layer in layers.items():
        if not isinstance(layer, dict) or not isinstance(layer.get("quant"), dict) or "bos" not in layer:
            raise QdiffError(f"{where}.layers.{name}: expected {{quant, bos}}, got {kind(layer)}")


def check_model_index(path: Path, data: dict[str, Any]) -> None:
    """``model_index.json`` as diffusers reads it: ``_class_name`` a diffusers pipeline class, and each of that
    pipeline's components ``[library, class]`` (strings or null). Errors name the file and the key."""
    import diffusers

    name = data.get("_class_name")
    if not isinstance(name, str):
        raise QdiffError(f"{path}: _class_name must be a pipeline class name (a string), got {kind(name)}")
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise QdiffError(f"{path}: _class_name {name!r} is not a pipeline class of this diffusers")
    _optional(data, "_diffusers_version", (str,), str(path), "a string")
    components, _ = cls._get_signature_keys(cls)
    for key in sorted(components & data.keys()):
        value = data[key]
        if not (isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)):
            raise QdiffError(f"{path}: {key}: expected [library, class] (strings or null), got {value!r:.80}")
