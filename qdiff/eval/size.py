"""Model size, measured from real tensors (in memory or in the exported safetensors), never from bit-widths.

:func:`module_footprint` measures a module in memory, :func:`checkpoint_footprint` the safetensors file(s) a
denoiser was loaded from (read from their headers), and :func:`size_line` puts both next to the quantized bytes:
a float16 checkpoint upcast to float32 on load is reported as both, never as the float32 copy alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from qdiff.export.manifest import read_manifest, verify_files
from qdiff.utils.nbytes import module_nbytes as _nbytes

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # floating codes
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers loads without a variant
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SINGLE_FILE_PREFIX = "model.diffusion_model."  # the denoiser's keys in an original single-file checkpoint


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, each storage once, meta tensors left out."""
    seen: set[int] = set()
    out = []
    for t in list(module.parameters()) + [b for _, b in module.named_buffers()]:
        if t.is_meta:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor the module holds, each storage once: parameters, buffers, tensor subclasses
    (torchao, quanto) flattened to their plain tensors, and library state such as bitsandbytes' ``quant_state``
    (:func:`qdiff.utils.nbytes.module_nbytes`)."""
    return _nbytes(module)


@dataclass(frozen=True)
class Footprint:
    """Measured bytes and element count of a set of tensors, and their floating dtypes (most bytes first)."""

    nbytes: int
    numel: int
    dtypes: tuple[str, ...]

    @property
    def dtype(self) -> str:
        """``float16``, or ``float16+float32`` for a mix (``?`` without floating tensors)."""
        return "+".join(self.dtypes) or "?"


def _footprint(items: list[tuple[str, int, int]]) -> Footprint:
    """From (dtype name, numel, bytes) per tensor."""
    by_dtype: dict[str, int] = {}
    for dtype, _, nbytes in items:
        if dtype.startswith(("float", "bfloat")):
            by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    order = tuple(sorted(by_dtype, key=lambda d: -by_dtype[d]))
    return Footprint(sum(i[2] for i in items), sum(i[1] for i in items), order)


def module_footprint(module: torch.nn.Module) -> Footprint:
    """:class:`Footprint` of a module's parameters and buffers as they are in memory now."""
    tensors = _module_tensors(module)
    return _footprint([(str(t.dtype).removeprefix("torch."), t.numel(), t.nbytes) for t in tensors])


def _header_items(path: Path, prefix: str = "") -> list[tuple[str, int, int]]:
    """(dtype name, numel, bytes) of each tensor in a safetensors file whose key starts with ``prefix``."""
    items = []
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(prefix):
                continue
            sl = f.get_slice(key)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            code = sl.get_dtype()
            items.append((_ST_DTYPES.get(code, code.lower()), numel, numel * _itemsize(code)))
    return items


def _weight_files(folder: Path) -> list[Path] | None:
    """The safetensors files diffusers loads from a model folder (no variant), or None."""
    if (folder / INDEX_NAME).is_file():
        shards = sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return [folder / WEIGHTS_NAME] if (folder / WEIGHTS_NAME).is_file() else None


def checkpoint_footprint(spec: str, denoiser: torch.nn.Module) -> Footprint | None:
    """The denoiser's tensors as stored in the checkpoint it was loaded from, read from safetensors headers.

    ``spec``: what the pipeline was loaded from. A ``.safetensors`` single file: its ``model.diffusion_model.*``
    tensors; otherwise the model folder diffusers recorded in the denoiser's config (a diffusers folder or a hub
    snapshot). None when there is no such file (builtin models), it cannot be read, or its element count differs
    from the loaded denoiser's by more than 1% (then it is not the same model, and no number beats a wrong one).
    """
    try:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".safetensors":
            items = _header_items(path, SINGLE_FILE_PREFIX)
        else:
            folder = Path(str(getattr(denoiser, "config", {}).get("_name_or_path") or ""))
            files = _weight_files(folder) if str(folder) not in ("", ".") and folder.is_dir() else None
            items = [i for f in files for i in _header_items(f)] if files else []
    except (OSError, ValueError, KeyError, TypeError):  # unreadable header / index: report memory only
        return None
    loaded = module_footprint(denoiser)
    if not items or abs(sum(i[1] for i in items) - loaded.numel) > 0.01 * loaded.numel:
        return None
    return _footprint(items)


def _fmt(nbytes: int, unit: int) -> str:
    return f"{nbytes / unit:.2f} {'GiB' if unit == 2**30 else 'MiB'}"


def size_line(checkpoint: Footprint | None, float_memory: Footprint, quantized: int) -> str:
    """``4.90 GiB float16 checkpoint (9.57 GiB as float32 in memory) -> 2.40 GiB quantized (0.490x the checkpoint)``.

    The in-memory float copy is shown when it differs from the checkpoint (an upcast on load); without a
    checkpoint file (builtin models) the ratio is to the in-memory float bytes.
    """
    unit = 2**30 if max(float_memory.nbytes, checkpoint.nbytes if checkpoint else 0) >= 2**30 else 2**20
    mem = f"{_fmt(float_memory.nbytes, unit)} {float_memory.dtype}"
    if checkpoint is None:
        return f"{mem} in memory -> {_fmt(quantized, unit)} quantized ({quantized / float_memory.nbytes:.3f}x)"
    same = (checkpoint.nbytes, checkpoint.dtypes) == (float_memory.nbytes, float_memory.dtypes)
    loaded = "" if same else f" ({_fmt(float_memory.nbytes, unit)} as {float_memory.dtype} in memory)"
    return (
        f"{_fmt(checkpoint.nbytes, unit)} {checkpoint.dtype} checkpoint{loaded} -> {_fmt(quantized, unit)} quantized "
        f"({quantized / checkpoint.nbytes:.3f}x the checkpoint)"
    )


def _tensor_bytes(folder: Path, weights: str) -> dict[str, int]:
    from qdiff.export.checkpoint import open_checkpoint  # one tensors file or a sharded index (headers only)

    with open_checkpoint(folder / weights) as reader:
        return {key: reader.nbytes(key) for key in reader.keys()}


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


@dataclass(frozen=True)
class ResidentBytes:
    """Where a quantized denoiser's bytes are now, measured from the tensors it holds (:func:`resident_bytes`).

    ``holders``: per place the weight codes of a quantized layer live (``stored codes``: the module's own tensor
    in the export's layout; ``cpu_int8 prepacked``: the backend's copy, the module's own released; both, where a
    copy could not give the codes back exactly) -> (layers, bytes); ``rest``: every other tensor (scales, float
    parameters, buffers); ``stored``: ``rest`` plus every layer's codes in the export's layout.
    """

    stored: int
    rest: int
    holders: dict[str, tuple[int, int]]

    @property
    def in_memory(self) -> int:
        return self.rest + sum(nbytes for _, nbytes in self.holders.values())


def resident_bytes(denoiser: torch.nn.Module) -> ResidentBytes:
    """Measure ``denoiser``: its tensors' bytes (each storage once, ``meta`` placeholders none) and each quantized
    layer's codes where they are held, prepacked copies by their own account (oneDNN's blocked layout)."""
    from qdiff.quant.modules import QuantLayer
    from qdiff.utils.nbytes import storage_nbytes

    codes: set[int] = set()
    holders: dict[str, tuple[int, int]] = {}
    stored_codes = 0
    for m in denoiser.modules():
        if not isinstance(m, QuantLayer) or m.state != "frozen":
            continue
        qweight, copy = m.qweight, m.prepack_slot.value
        codes.add(id(qweight))
        stored_codes += qweight.numel() * qweight.element_size()  # a placeholder keeps the stored shape and dtype
        own = 0 if qweight.is_meta else qweight.nbytes
        where = "stored codes" if copy is None else f"{copy.backend} prepacked"
        where += "" if copy is None or qweight.is_meta else " + stored codes"
        layers, nbytes = holders.get(where, (0, 0))
        holders[where] = (layers + 1, nbytes + own + (0 if copy is None else copy.nbytes()))
    tensors = [t for t in (*denoiser.parameters(), *denoiser.buffers()) if id(t) not in codes]
    rest = storage_nbytes(tensors)
    return ResidentBytes(rest + stored_codes, rest, holders)
