"""Streaming safetensors writer: a planned header first, then tensors one at a time, sharded, with an index.

A safetensors file is ``<u64 header length><JSON header><data>``; the header gives every tensor's dtype, shape and
byte range. When every name, shape and dtype is known in advance (a planned export, a random checkpoint), the header
can be written first and each tensor written into its byte range as it is produced, then dropped: peak memory is
one tensor, not one file. Within a file the layout is safetensors' own (by dtype, larger elements first, then by
name): every tensor is aligned to its element size whatever order the tensors arrive in, and a file holds the
same bytes ``safetensors.torch.save_file`` writes for the same tensors and metadata.

Shards are planned from byte sizes alone, greedily in production order (a tensor that alone exceeds the limit gets a
shard of its own); with more than one shard the files are ``<stem>-0000K-of-0000N.safetensors`` plus
``<stem>.safetensors.index.json`` = ``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`` (the
diffusers / transformers index format). Files are written as ``<name>.partial`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qdiff.errors import QdiffError

INDEX_SUFFIX = ".index.json"
# safetensors dtype codes, in safetensors' own file order (its Dtype enum, descending): larger elements first
_CODES = (
    ("uint64", "U64"), ("int64", "I64"), ("float64", "F64"), ("float32", "F32"), ("uint32", "U32"), ("int32", "I32"),
    ("bfloat16", "BF16"), ("float16", "F16"), ("uint16", "U16"), ("int16", "I16"), ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
)  # fmt: skip
ST_CODES: dict[torch.dtype, str] = {getattr(torch, n): code for n, code in _CODES if hasattr(torch, n)}
_RANK = {dtype: i for i, dtype in enumerate(ST_CODES)}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor to be written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving shard plan: a shard closes when the next tensor would push it over ``max_bytes``;
    a tensor larger than ``max_bytes`` gets a shard of its own. Deterministic, from (name, nbytes) alone."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(n: int, weights_name: str) -> list[str]:
    """``[weights_name]`` for one shard, else ``<stem>-0000K-of-0000N.safetensors`` (K = 1..n)."""
    if n == 1:
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    return [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def index_name(weights_name: str) -> str:
    """``qdiff.safetensors`` -> ``qdiff.safetensors.index.json``."""
    return weights_name + INDEX_SUFFIX


def layout(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """safetensors' own file order (``save_file`` writes the same bytes): by dtype, larger elements first, then by
    name, which keeps every tensor aligned to its element size."""
    for s in specs:
        if s.dtype not in _RANK:
            raise QdiffError(f"tensor {s.name!r}: dtype {s.dtype} cannot be written to safetensors")
    return sorted(specs, key=lambda s: (_RANK[s.dtype], s.name))


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, dict]:
    """(length-prefixed JSON header padded to 8 bytes, name -> (begin, end) data offsets) in :func:`layout` order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for s in layout(specs):
        offsets[s.name] = (offset, offset + s.nbytes)
        header[s.name] = {"dtype": ST_CODES[s.dtype], "shape": list(s.shape), "data_offsets": list(offsets[s.name])}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsWriter:
    """One safetensors file written tensor by tensor, in any order, into a planned header.

    ``write`` checks the tensor against its spec and writes its bytes at their planned offset; ``close`` checks
    that every planned tensor was written and renames ``<path>.partial`` to ``path``; ``abort`` removes the partial.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise QdiffError(f"{self.path}: a tensor name is planned twice")
        header, self._offsets = safetensors_header(specs, metadata)
        self._data_start = len(header)
        self._pending = set(self.specs)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._f: BinaryIO | None = open(self._partial, "wb", buffering=0)  # closed by close() / abort()
        self._f.write(header)
        self._f.truncate(self._data_start + sum(s.nbytes for s in specs))  # full size now: offsets stay valid

    @property
    def done(self) -> bool:
        return not self._pending

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (any device; copied to CPU only if it is elsewhere)."""
        if self._f is None:
            raise QdiffError(f"{self.path}: writer is closed")
        spec = self.specs.get(name)
        if spec is None or name not in self._pending:
            raise QdiffError(f"{self.path}: tensor {name!r} is {'not planned' if spec is None else 'written twice'}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            got = f"{tuple(tensor.shape)} {tensor.dtype}"
            raise QdiffError(f"{self.path}: tensor {name!r} is {got}, planned {spec.shape} {spec.dtype}")
        begin, _ = self._offsets[name]
        if spec.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self._f.seek(self._data_start + begin)
            view = memoryview(data)
            while view:  # raw file: write() may write less than asked
                view = view[self._f.write(view) :]
        self._pending.discard(name)

    def close(self) -> Path:
        if self._f is None:
            return self.path
        if self._pending:
            self.abort()
            first = min(self._pending)
            raise QdiffError(f"{self.path}: {len(self._pending)} planned tensor(s) never written, e.g. {first!r}")
        self._f.close()
        self._f = None
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._partial.unlink(missing_ok=True)


class ShardedWriter:
    """Tensors planned in production order, cut into shards of at most ``max_shard_bytes``, written as they come.

    A shard file is opened when its first tensor arrives and closed (renamed from ``.partial``) when its last one is
    written, so with tensors arriving in production order one file is open at a time. ``close`` writes the index
    when there is more than one shard and returns the files written (index last).
    """

    def __init__(self, folder: Path, weights_name: str, specs: Sequence[TensorSpec], max_shard_bytes: float,
                 metadata: dict[str, str] | None = None) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.weights_name = weights_name
        self.metadata = metadata
        self._specs = {s.name: s for s in specs}
        plan = plan_shards([(s.name, s.nbytes) for s in specs], int(max_shard_bytes)) or [[]]  # [[]]: one empty file
        names = shard_file_names(len(plan), weights_name)
        self._shard_of = {n: i for i, shard in enumerate(plan) for n in shard}
        self._plan, self._names = plan, names
        self._open: dict[int, SafetensorsWriter] = {}
        self._closed: set[int] = set()

    @property
    def files(self) -> list[Path]:
        """The shard files (and the index when sharded), whether written yet or not."""
        files = [self.folder / n for n in self._names]
        return files + ([self.folder / index_name(self.weights_name)] if len(files) > 1 else [])

    @property
    def entry_file(self) -> str:
        """The file a reader opens: the single weights file, or the index."""
        return self._names[0] if len(self._names) == 1 else index_name(self.weights_name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i = self._shard_of.get(name)
        if i is None:
            raise QdiffError(f"{self.folder / self.weights_name}: tensor {name!r} is not planned")
        if i in self._closed:
            raise QdiffError(f"{self.folder / self._names[i]}: tensor {name!r} is written twice")
        if i not in self._open:
            specs = [self._specs[n] for n in self._plan[i]]
            self._open[i] = SafetensorsWriter(self.folder / self._names[i], specs, self.metadata)
        writer = self._open[i]
        writer.write(name, tensor)
        if writer.done:
            writer.close()
            del self._open[i]
            self._closed.add(i)

    def close(self) -> list[Path]:
        for i in range(len(self._plan)):
            if i in self._closed:
                continue
            if i not in self._open:  # nothing arrived for this shard
                specs = [self._specs[n] for n in self._plan[i]]
                self._open[i] = SafetensorsWriter(self.folder / self._names[i], specs, self.metadata)
            self._open.pop(i).close()  # raises, naming a tensor never written, unless the shard is empty
            self._closed.add(i)
        if len(self._names) > 1:
            weight_map = {n: self._names[i] for n, i in self._shard_of.items()}
            total = sum(s.nbytes for s in self._specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / index_name(self.weights_name)).write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def abort(self) -> None:
        for writer in self._open.values():
            writer.abort()
        self._open.clear()


def write_safetensors(
    path: Path,
    specs: Sequence[TensorSpec],
    make: Callable[[TensorSpec], torch.Tensor],
    progress: Callable[[int], Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """One safetensors file from ``make(spec)`` called once per spec, in ``specs`` order (one tensor in memory)."""
    writer = SafetensorsWriter(path, specs, metadata if metadata is not None else {"format": "pt"})
    try:
        for s in specs:
            t = make(s)
            writer.write(s.name, t)
            del t
            if progress is not None:
                progress(s.nbytes)
        writer.close()
    except BaseException:
        writer.abort()
        raise
