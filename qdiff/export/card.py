"""The model card (``README.md``) of an export, and the diffusers-facing files of its denoiser folder.

Every export gets, before its files are hashed into ``qdiff.json``:

* ``<attr>/config.json`` with ``quantization_config`` (``{"quant_method": "qdiff", "format_version", "recipe"}``),
  so that diffusers routes ``from_pretrained`` to the qdiff backend (``qdiff.integrations.diffusers``);
* ``<attr>/diffusion_pytorch_model.safetensors.index.json``: a diffusers shard index whose ``weight_map`` names
  the qdiff tensors files (``qdiff.safetensors`` or its shards) — diffusers finds the tensors by it, the qdiff
  quantizer reads and checks them (no tensor is duplicated or renamed);
* ``README.md``: a Hugging Face model card (YAML header; recipe, per-layer bits, measured bytes, how to load).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from qdiff.export.checkpoint import open_checkpoint
from qdiff.export.manifest import FORMAT_VERSION, read_manifest, sha256_file, write_manifest

CARD = "README.md"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"  # diffusers' SAFE_WEIGHTS_INDEX_NAME
QUANT_METHOD = "qdiff"


def quantization_config(recipe_name: str) -> dict[str, Any]:
    """The ``quantization_config`` entry of the denoiser's config.json."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "recipe": recipe_name}


def write_denoiser_files(folder: Path, weights: str, recipe_name: str) -> None:
    """Add ``quantization_config`` to ``folder/config.json`` and write the diffusers shard index pointing at
    ``weights`` (the qdiff tensors file or its ``.safetensors.index.json``, relative to ``folder``)."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config(recipe_name)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with open_checkpoint(folder / weights) as reader:
        weight_map = {key: Path(reader.file_of(key)).name for key in reader.keys()}
    index = {"metadata": {"format": "qdiff", "qdiff_weights": weights}, "weight_map": weight_map}
    (folder / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _bytes(folder: Path, weights: str, layers: dict[str, Any], float_itemsize: int) -> tuple[int, int]:
    """(stored bytes of the denoiser tensors, bytes of the same denoiser in the checkpoint's own dtype): each
    quantized layer counts ``prod(weight_shape) * itemsize`` plus its bias in the float total."""
    stored = floating = 0
    with open_checkpoint(folder / weights) as reader:
        for key in reader.keys():
            n = math.prod(reader.shape(key)) * reader.dtype(key).itemsize
            stored += n
            owner, _, leaf = key.rpartition(".")
            if owner not in layers or leaf == "bias":
                floating += n
    for entry in layers.values():
        floating += math.prod(entry["weight_shape"]) * float_itemsize
    return stored, floating


def _bits_table(layers: dict[str, Any]) -> list[str]:
    counts = Counter(
        (
            e["quant"]["w_bits"],
            e["quant"].get("a_bits") or "float",
            e["quant"].get("group_size") or e["quant"].get("granularity"),
        )
        for e in layers.values()
    )
    rows = ["| weights (bits) | activations (bits) | granularity / group | layers |", "|---|---|---|---|"]
    rows += [f"| {w} | {a} | {g} | {n} |" for (w, a, g), n in sorted(counts.items(), key=str)]
    return rows


def _load_lines(cls: str, attr: str, denoiser_only: bool) -> list[str]:
    """The ways to load the export (a denoiser-only export has no pipeline: qdiff's loader and the class)."""
    lines = ["# qdiff"]
    if denoiser_only:
        lines += ["from qdiff.export.load import load_denoiser_export", f'{attr} = load_denoiser_export("PATH")']
    else:
        lines += ["import qdiff", 'pipe = qdiff.load("PATH")']
    lines += ["# diffusers, after one import", "import qdiff.integrations.diffusers  # registers quant_method qdiff"]
    if not denoiser_only:
        lines += ["from diffusers import DiffusionPipeline", 'pipe = DiffusionPipeline.from_pretrained("PATH")']
    lines += ["# the denoiser alone", f"from diffusers import {cls}"]
    return lines + [f'{attr} = {cls}.from_pretrained("PATH", subfolder="{attr}")']


def write_card(root: Path, manifest: dict[str, Any], eval_table: str | None = None) -> None:
    """Write ``root/README.md`` from the (not yet hashed) manifest fields and the written tensors."""
    import torch

    den = manifest["denoiser"]
    attr, weights = den["attr"], den["weights"]
    recipe = manifest.get("recipe") or {}
    name = recipe.get("name", "custom")
    itemsize = getattr(torch, manifest.get("torch_dtype") or "float32").itemsize
    stored, floating = _bytes(root, weights, manifest["layers"], itemsize)
    base = manifest.get("base_model")
    header = ["---", "library_name: diffusers", *([f"base_model: {base}"] if base else []), "tags:"]
    header += [f"- {t}" for t in ("qdiff", "quantized", f"qdiff-{name}", den.get("family", "diffusion"))] + ["---"]
    body = [
        f"# {base or 'model'} quantized with qdiff ({name})",
        "",
        f"Recipe `{name}`; {len(manifest['layers'])} quantized layers in `{attr}` ({den['class']}).",
        "",
        *_bits_table(manifest["layers"]),
        "",
        f"Denoiser tensors: {stored:,} bytes stored vs {floating:,} bytes in the checkpoint's own dtype "
        f"({manifest.get('torch_dtype')}): {floating / max(stored, 1):.2f}x smaller.",
        "",
        *(["## Evaluation", "", eval_table, ""] if eval_table else []),
        "## Load it",
        "",
        "```python",
        *_load_lines(den["class"], attr, bool(manifest.get("denoiser_only"))),
        "```",
        "",
        "Every load checks the format version, the sha256 of every file in `qdiff.json`, tensor shapes and dtypes,",
        "and refuses pickle files.",
    ]
    (root / CARD).write_text("\n".join(header + body) + "\n")


def add_eval_table(root: Path, table: str) -> None:
    """Put an evaluation table (``qdiff quantize --eval``, run after the export was written) into the export's
    card and re-hash the card in ``qdiff.json``; the rest of the export is unchanged."""
    manifest = read_manifest(root)
    write_card(root, manifest, eval_table=table.strip())
    manifest["files"][CARD] = sha256_file(root / CARD)
    write_manifest(root, manifest)
