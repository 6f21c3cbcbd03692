"""Model size, measured from real tensors (in memory or in the exported safetensors), never from bit-widths."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from qdiff.export.manifest import read_manifest, verify_files

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + [b for _, b in module.named_buffers()]:
        if t.is_meta:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _tensor_bytes(folder: Path, weights: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with safe_open(str(folder / weights), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            out[key] = numel * _itemsize(sl.get_dtype())
    return out


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[dtype]


def export_report(folder: Path, limit: int | None = 40) -> str:
    """A text table of an export: per quantized layer bits and stored bytes vs float bytes, then totals."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    dtype_bytes = _DTYPE_BYTES.get(manifest.get("torch_dtype", "float32"), 4)
    tensor_bytes = _tensor_bytes(folder, manifest["denoiser"]["weights"])
    rows, q_layer_total, fp_layer_total = [], 0, 0
    for name, entry in manifest["layers"].items():
        stored = sum(b for k, b in tensor_bytes.items() if k.startswith(name + "."))
        n, *rest = entry["weight_shape"]
        k = 1
        for d in rest:
            k *= d
        bias = tensor_bytes.get(name + ".bias", 0)
        fp = n * k * dtype_bytes + bias
        q = entry["quant"]
        tag = f"W{q['w_bits']}A{q['a_bits'] or 16}"
        gran = q["granularity"] + (f"/{q['group_size']}" if q.get("group_size") else "")
        rows.append((name, tag, gran, q["a_mode"] if q["a_bits"] else "-", stored, fp))
        q_layer_total += stored
        fp_layer_total += fp
    other = sum(tensor_bytes.values()) - q_layer_total
    width = max([len(r[0]) for r in rows] + [5])
    lines = [
        f"export     {folder}  (format v{manifest['format_version']}, qdiff {manifest.get('qdiff_version')})",
        f"base model {manifest.get('base_model')}   pipeline {manifest.get('pipeline_class')}   "
        f"denoiser {manifest['denoiser']['class']} ({manifest['denoiser']['family']})",
        f"recipe     {(manifest.get('recipe') or {}).get('name')}   plan {'yes' if manifest.get('plan') else 'no'}"
        f"   files {len(manifest['files'])} (sha256 verified)",
        "",
        f"{'layer':<{width}}  {'bits':<6} {'weights':<12} {'acts':<8} {'bytes':>10} {'fp bytes':>10} {'ratio':>6}",
    ]
    for name, tag, gran, mode, stored, fp in rows[:limit] if limit else rows:
        lines.append(f"{name:<{width}}  {tag:<6} {gran:<12} {mode:<8} {stored:>10} {fp:>10} {stored / fp:>6.3f}")
    if limit and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more layers (--all to list them)")
    q_total, fp_total = q_layer_total + other, fp_layer_total + other
    lines += [
        "",
        f"quantized layers  {len(rows)}: {q_layer_total / 2**20:.3f} MiB stored vs {fp_layer_total / 2**20:.3f} MiB "
        f"float ({q_layer_total / max(fp_layer_total, 1):.3f}x)",
        f"denoiser total    {q_total / 2**20:.3f} MiB vs {fp_total / 2**20:.3f} MiB float ({q_total / fp_total:.3f}x)",
    ]
    return "\n".join(lines)
