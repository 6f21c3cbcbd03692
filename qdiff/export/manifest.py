"""The export manifest ``qdiff.json``: format version, recipe, plan, per-layer specs and file hashes.

Format versions (docs/export-format.md):

* 1 — layer entries ``{"weight_shape", "quant": {LayerQuant fields}, "bos"?}``; ``quant.a_split`` and ``bos``
  were added without a version bump, so either may be missing (read as ``None`` / not BOS-aware).
* 2 — every layer entry has all of ``weight_shape``, ``quant`` (every LayerQuant field and
  ``"spec_version": 2``) and ``bos`` (``"none"`` when the layer is not BOS-aware); unknown keys are refused.

Both versions load; this qdiff writes version 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qdiff.config.layer import LayerQuant
from qdiff.errors import QdiffError
from qdiff.export.checks import check_manifest, export_files, inside, json_object, parse_json, refuse_link
from qdiff.utils.hashing import sha256_file

MANIFEST = "qdiff.json"
FORMAT = "qdiff-export"
FORMAT_VERSION = 2  # written
READABLE_VERSIONS = (1, 2)
BOS_NONE = "none"  # the ``bos`` field of a layer that is not BOS-aware (format 2)
LAYER_KEYS = ("weight_shape", "quant", "bos")
WEIGHTS_FILE = "qdiff.safetensors"  # or, sharded: qdiff-0000K-of-0000N.safetensors + qdiff.safetensors.index.json
MAX_SHARD_BYTES = 2e9  # denoiser tensors per shard file (10^9 bytes, as diffusers counts)
WEIGHTS_METADATA = {"format": "pt", "qdiff": "1"}  # safetensors header metadata of the tensors files
# Anything that could execute code when loaded is refused outright.
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".joblib")


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest itself, keyed by POSIX relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and check ``folder/qdiff.json`` (format and version); errors name the file."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise QdiffError(f"export folder {folder} not found")
    if path.is_symlink():
        refuse_link(folder, path)  # before it is read; a huggingface_hub cache entry passes
    if not path.is_file():
        raise QdiffError(f"{folder} is not a qdiff export (no {MANIFEST})")
    data = parse_json(path, _read(path))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise QdiffError(f'{path}: not a qdiff export manifest (missing "format": "{FORMAT}")')
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise QdiffError(
            f"{path}: format version {version!r} is not supported "
            f"(this qdiff reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    check_manifest(folder, data, path)  # field types; every path it names stays inside the folder
    return data


def verify_files(folder: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Refuse links and special files (before any read), pickle-capable files, missing or unlisted files, any
    sha256 mismatch and any ``.json`` file that is not a JSON object; errors name the file. Each file is read
    once: hashed and, for JSON, parsed; returns the JSON documents by relative path."""
    present = export_files(folder)  # nothing read yet: refuses symbolic links, FIFOs, devices
    for p in present.values():
        if p.suffix.lower() in FORBIDDEN_SUFFIXES:
            raise QdiffError(f"{p}: refusing to load a {p.suffix} file (qdiff loads only safetensors and JSON)")
    present.pop(MANIFEST, None)
    listed: dict[str, str] = manifest["files"]
    for rel in listed:
        inside(folder, rel, f"{folder / MANIFEST}: files")  # read_manifest checked it too
    extra = sorted(set(present) - set(listed))
    if extra:
        raise QdiffError(f"{folder / extra[0]}: file is not listed in {MANIFEST} (added after export?)")
    docs: dict[str, dict[str, Any]] = {}
    for rel, digest in listed.items():
        path = present.get(rel)
        if path is None:
            raise QdiffError(f"{folder / rel}: listed in {MANIFEST} but missing")
        data = _read(path) if rel.endswith(".json") else None
        if (sha256_file(path) if data is None else hashlib.sha256(data).hexdigest()) != digest:
            raise QdiffError(f"{path}: sha256 mismatch with {MANIFEST} (file was modified or corrupted)")
        if data is not None:
            docs[rel] = json_object(path, data)
    return docs


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise QdiffError(f"{path}: cannot read ({exc})") from None


def build_manifest(
    *,
    base_model: str | None,
    pipeline_class: str | None,
    torch_dtype: str,
    denoiser: dict[str, str],
    recipe: dict[str, Any],
    plan: dict[str, Any] | None,
    layers: dict[str, Any],
    schedule: dict[str, Any] | None,
    files: dict[str, str],
    text_encoders: dict[str, Any] | None = None,
    denoiser_only: bool = False,
    lora_adapters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``qdiff.json`` document, written alike by ``qdiff.save`` and the streaming quantizer.

    ``denoiser``: ``{attr, class, family, weights}`` with ``weights`` the single tensors file or, when sharded, the
    ``.safetensors.index.json`` naming the shards. ``denoiser_only``: the export holds only the denoiser (streamed
    from a denoiser folder or single file: no VAE, text encoders, tokenizers or scheduler; no ``model_index.json``).
    ``lora_adapters``: unfused LoRA adapters saved beside the export in ``lora/`` (:mod:`qdiff.lora.saved`).
    """
    import qdiff

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qdiff_version": qdiff.__version__,
        "base_model": base_model,
        "pipeline_class": pipeline_class,
        "torch_dtype": torch_dtype,
        "denoiser": denoiser,
        "recipe": recipe,
        "plan": plan,
        "layers": layers,  # versioned layer specs
        **({"text_encoders": text_encoders} if text_encoders else {}),  # optional field
        **({"denoiser_only": True} if denoiser_only else {}),  # optional field
        **({"lora_adapters": lora_adapters} if lora_adapters else {}),  # optional field
        "schedule": schedule,  # Q-Sched coefficients (also in scheduler/qsched.json), or None
        "files": files,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def layer_entry(module) -> dict[str, Any]:
    """The format-2 manifest entry of one quantized layer (a ``QuantLayer``)."""
    return {
        "weight_shape": list(module.weight_shape),
        "quant": module.qcfg.to_dict(),
        "bos": getattr(module, "bos_mode", BOS_NONE),  # BOS-aware cross-attention K/V: "cached" | "per_call"
    }


def read_layers(manifest: dict[str, Any], source: Path | str) -> tuple[dict[str, LayerQuant], dict[str, str]]:
    """``(specs, bos)`` from the manifest's layer table: layer name -> LayerQuant, and -> BOS mode for the
    BOS-aware ones. Format 1 entries may lack ``bos`` and ``quant.a_split``; format 2 entries must have every
    key. Errors name ``source`` and the layer."""
    from qdiff.quant.bos import BOS_MODES

    version = manifest.get("format_version")
    specs: dict[str, LayerQuant] = {}
    bos: dict[str, str] = {}
    for name, entry in manifest["layers"].items():
        where = f"{source}: layers.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("quant"), dict):
            raise QdiffError(f"{where}: expected a mapping with a 'quant' layer spec")
        unknown = [k for k in entry if k not in LAYER_KEYS]
        if version >= 2 and unknown:
            raise QdiffError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(LAYER_KEYS)})")
        missing = [k for k in LAYER_KEYS if k not in entry]
        if version >= 2 and missing:
            raise QdiffError(f"{where}: missing key {missing[0]!r} (format {version} writes {', '.join(LAYER_KEYS)})")
        quant = entry["quant"]
        if version >= 2 and quant.get("spec_version") != 2:
            got = quant.get("spec_version")
            raise QdiffError(f"{where}.quant: format {version} writes spec_version 2, got {got!r}")
        specs[name] = LayerQuant.from_dict(quant, where=f"{where}.quant")
        mode = entry.get("bos", BOS_NONE)
        if mode not in (BOS_NONE, *BOS_MODES):
            raise QdiffError(f"{where}: bos must be one of {', '.join((BOS_NONE, *BOS_MODES))}, got {mode!r}")
        if mode != BOS_NONE:
            bos[name] = mode
    return specs, bos
