"""Streaming safetensors writer (qdiff.export.shards): byte-identical to safetensors, sharded, one tensor at a time."""

from __future__ import annotations

import json
import random
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qdiff.errors import QdiffError
from qdiff.export.checkpoint import open_checkpoint
from qdiff.export.shards import (
    ST_CODES,
    SafetensorsWriter,
    ShardedWriter,
    TensorSpec,
    plan_shards,
    shard_file_names,
    write_safetensors,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two tensors of every writable dtype, odd sizes (an aligned layout must not depend on luck), a 0-d one."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(ST_CODES):
        for j in range(2):
            out[f"{'kqxbm'[(i + j) % 5]}.{i}.{j}"] = torch.randn(3 + j, 1 + i % 3, generator=g).mul(9).to(dtype)
    out["scalar"] = torch.tensor(0.25)
    return out


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def test_file_is_byte_identical_to_safetensors_in_any_write_order(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    writer = SafetensorsWriter(tmp_path / "ours.safetensors", _specs(tensors), {"format": "pt"})
    order = list(tensors)
    random.Random(1).shuffle(order)
    for name in order:
        writer.write(name, tensors[name])
    assert not (tmp_path / "ours.safetensors").exists()  # written as .partial until complete
    writer.close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:  # the reference reader agrees
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)


def test_plan_shards_and_names():
    sizes = [("a", 40), ("b", 50), ("c", 30), ("big", 500), ("d", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d"]]
    assert plan_shards(sizes, 10**9) == [[n for n, _ in sizes]]
    assert shard_file_names(1, "qdiff.safetensors") == ["qdiff.safetensors"]
    assert shard_file_names(3, "qdiff.safetensors")[2] == "qdiff-00003-of-00003.safetensors"


def test_sharded_writer_writes_index_and_loads_back(tmp_path):
    tensors = _tensors(2)
    specs = _specs(tensors)
    writer = ShardedWriter(tmp_path, "qdiff.safetensors", specs, 60, {"format": "pt"})
    for name, t in tensors.items():  # production order: one shard file open at a time
        writer.write(name, t)
        assert len(list(tmp_path.glob("*.partial"))) <= 1
    files = writer.close()
    index = json.loads((tmp_path / "qdiff.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 3 and files[-1].name == "qdiff.safetensors.index.json" and writer.entry_file == files[-1].name
    assert [f.name for f in files[:-1]] == shards
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    for shard in shards:  # each shard is a plain safetensors file under the limit (or one tensor alone)
        sizes = [t.numel() * t.element_size() for t in load_file(tmp_path / shard).values()]
        assert sum(sizes) <= 60 or len(sizes) == 1
    with open_checkpoint(tmp_path / "qdiff.safetensors.index.json") as reader:
        assert set(reader.keys()) == set(tensors)
        for name, t in tensors.items():
            assert reader.get(name).dtype == t.dtype and torch.equal(reader.get(name), t)


def test_single_shard_keeps_the_plain_name(tmp_path):
    tensors = _tensors(3)
    writer = ShardedWriter(tmp_path, "qdiff.safetensors", _specs(tensors), 2e9)
    for name, t in tensors.items():
        writer.write(name, t)
    assert [f.name for f in writer.close()] == ["qdiff.safetensors"] and writer.entry_file == "qdiff.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdiff.safetensors"]


def test_write_safetensors_holds_one_tensor_at_a_time(tmp_path):
    specs = [TensorSpec(f"t{i}", (64, 32), torch.bfloat16) for i in range(5)]
    alive: list[weakref.ref] = []

    def make(spec):
        assert all(ref() is None for ref in alive), "a previous tensor is still held while the next is made"
        t = torch.full(spec.shape, float(spec.name[1:]), dtype=spec.dtype)
        alive.append(weakref.ref(t))
        return t

    write_safetensors(tmp_path / "x.safetensors", specs, make)
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[s.name], torch.full(s.shape, float(s.name[1:]), dtype=s.dtype)) for s in specs)


def test_writer_errors_name_the_tensor_and_leave_no_file(tmp_path):
    specs = [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.int8)]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(QdiffError, match=r"tensor 'a' is \(3, 2\) torch.float32, planned \(2, 3\) torch.float32"):
        writer.write("a", torch.zeros(3, 2))
    with pytest.raises(QdiffError, match=r"tensor 'a' is \(2, 3\) torch.float16, planned"):
        writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(QdiffError, match="tensor 'c' is not planned"):
        writer.write("c", torch.zeros(1))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(QdiffError, match="tensor 'a' is written twice"):
        writer.write("a", torch.zeros(2, 3))
    with pytest.raises(QdiffError, match=r"1 planned tensor\(s\) never written, e.g. 'b'"):
        writer.close()
    assert list(tmp_path.iterdir()) == []  # the partial file is gone

    sharded = ShardedWriter(tmp_path, "qdiff.safetensors", specs, 10)
    sharded.write("a", torch.zeros(2, 3))  # the first shard is complete and renamed; the second never starts
    with pytest.raises(QdiffError, match="never written, e.g. 'b'"):
        sharded.close()
    with pytest.raises(QdiffError, match="cannot be written to safetensors"):
        SafetensorsWriter(tmp_path / "c.safetensors", [TensorSpec("z", (2,), torch.complex64)])
