"""Streaming checkpoint reader (qdiff.export.checkpoint) and the real-size random checkpoint writer script."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file, save_file

from qdiff.errors import QdiffError
from qdiff.export.checkpoint import INDEX_NAME, WEIGHTS_NAME, iter_tensors, open_checkpoint

TINY_UNET = dict(
    block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    norm_num_groups=8,
    layers_per_block=1,
    attention_head_dim=8,
    sample_size=16,
)


def _unet(dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).to(dtype).eval()


@pytest.fixture(scope="module")
def script():
    return load_script("make_real_checkpoint")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny bf16 UNet saved by diffusers in ~200 KB shards with an index."""
    model = _unet(torch.bfloat16)
    folder = tmp_path_factory.mktemp("ckpt") / "unet"
    model.save_pretrained(folder, max_shard_size="200KB")
    return model, folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "unet"))


def _raises(match: str):
    return pytest.raises(QdiffError, match=match)


def test_sharded_folder_reads_every_tensor(sharded):
    model, folder = sharded
    sd = model.state_dict()
    assert (folder / INDEX_NAME).is_file()
    with open_checkpoint(folder) as reader:
        assert len(reader.files()) > 2
        assert set(reader.keys()) == set(sd) and len(reader) == len(sd)
        assert reader.config == json.loads((folder / "config.json").read_text())
        assert reader.total_bytes() == sum(t.numel() * t.element_size() for t in sd.values())
        seen = 0
        for name, tensor in iter_tensors(reader):
            assert reader.shape(name) == tuple(sd[name].shape) and reader.dtype(name) == torch.bfloat16
            assert tensor.dtype == sd[name].dtype and torch.equal(tensor, sd[name]), name
            seen += 1
        assert seen == len(sd)
        # keys come shard by shard, so iterating opens each file's pages once, in order
        order = [reader.file_of(n).name for n in reader.keys()]
        assert order == sorted(order)
        assert [n for n, _ in iter_tensors(reader, ["conv_in.bias", "conv_out.weight"])] == [
            "conv_in.bias",
            "conv_out.weight",
        ]
        with _raises("no tensor named 'nope'"):
            reader.get("nope")
    with _raises("closed"):
        reader.get("conv_in.weight")


def test_get_returns_private_copies_and_survives_truncation(sharded, tmp_path):
    folder = _copy(sharded[1], tmp_path)
    with open_checkpoint(folder) as reader:
        a, b = reader.get("conv_in.weight"), reader.get("conv_in.weight")
        a.add_(1)
        assert torch.equal(b, sharded[0].state_dict()["conv_in.weight"])  # no aliasing between gets
        last = reader.keys()[-1]
        path = reader.file_of(last)
        path.write_bytes(path.read_bytes()[:-8])  # the file shrinks while open: an error, not a crash
        with _raises(f"{path.name}: file ends inside tensor '{last}'"):
            reader.get(last)


def test_pipeline_folder_and_subfolder(sharded, tmp_path):
    model, folder = sharded
    shutil.copytree(folder, tmp_path / "unet")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for reader in (open_checkpoint(tmp_path, "unet"), open_checkpoint(tmp_path)):
        with reader:
            assert reader.source == tmp_path / "unet" and set(reader.keys()) == set(model.state_dict())
    with _raises("no such subfolder"):
        open_checkpoint(tmp_path, "transformer")


def test_unsharded_folder_and_single_file(tmp_path):
    model = _unet(torch.float16)
    sd = model.state_dict()
    model.save_pretrained(tmp_path / "unet")
    save_file(sd, tmp_path / "one.safetensors")
    for path, has_config in ((tmp_path / "unet", True), (tmp_path / "one.safetensors", False)):
        with open_checkpoint(path) as reader:
            assert (reader.config is not None) == has_config and len(reader.files()) == 1
            for name, tensor in iter_tensors(reader):
                assert tensor.dtype == torch.float16 and torch.equal(tensor, sd[name])


def test_missing_shard_names_the_file(sharded, tmp_path):
    folder = _copy(sharded[1], tmp_path)
    victim = sorted(folder.glob("*-00002-of-*.safetensors"))[0]
    victim.unlink()
    with _raises(f"{victim.name}: shard named by {INDEX_NAME} is missing") as info:
        open_checkpoint(folder)
    assert "\n" not in str(info.value)


def test_index_key_not_in_its_shard(sharded, tmp_path):
    folder = _copy(sharded[1], tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    other = next(n for n, f in index["weight_map"].items() if f != first)
    index["weight_map"][other] = first
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with _raises(f"{first}: tensor '{other}' listed in the index is not in this shard"):
        open_checkpoint(folder)


def test_bad_json_names_the_file(sharded, tmp_path):
    folder = _copy(sharded[1], tmp_path)
    (folder / INDEX_NAME).write_text('{"weight_map": {')
    with _raises(f"{INDEX_NAME}: not valid JSON"):
        open_checkpoint(folder)
    (folder / INDEX_NAME).write_text('{"metadata": {}}')
    with _raises(f'{INDEX_NAME}: no "weight_map"'):
        open_checkpoint(folder)
    (folder / INDEX_NAME).write_text('{"weight_map": {"conv_in.weight": "../x.safetensors"}}')
    with _raises("is not a file name in this folder"):
        open_checkpoint(folder)
    (folder / INDEX_NAME).unlink()
    (folder / "config.json").write_text("{oops")
    with _raises("config.json: not valid JSON"):
        open_checkpoint(folder)


def test_corrupt_shard_names_the_file(sharded, tmp_path):
    folder = _copy(sharded[1], tmp_path)
    shard = sorted(folder.glob("*-00003-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated download
    with _raises(f"{shard.name}: not a readable safetensors file"):
        open_checkpoint(folder)
    shard.write_bytes(b"\xff" * 64)  # garbage header
    with _raises(f"{shard.name}: not a readable safetensors file"):
        open_checkpoint(folder)


def test_pickle_files_are_refused(tmp_path):
    model = _unet()
    model.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert not (tmp_path / "unet" / WEIGHTS_NAME).exists()
    with _raises(r"diffusion_pytorch_model\.bin: refusing to load a \.bin file") as info:
        open_checkpoint(tmp_path / "unet")
    assert "\n" not in str(info.value)
    for name in ("model.ckpt", "model.pt", "model.bin"):
        (tmp_path / name).write_bytes(b"not opened")
        with _raises(f"{name}: refusing to load"):
            open_checkpoint(tmp_path / name)
    with _raises("checkpoint not found"):
        open_checkpoint(tmp_path / "absent.safetensors")


# --- scripts/make_real_checkpoint.py ------------------------------------------------------------------------------


def test_plan_shards(script):
    sizes = [("a", 40), ("b", 50), ("c", 30), ("big", 500), ("d", 10), ("e", 100), ("f", 1)]
    plan = script.plan_shards(sizes, 100)
    assert plan == [["a", "b"], ["c"], ["big"], ["d"], ["e"], ["f"]]
    assert script.plan_shards(sizes, 100) == plan  # deterministic
    assert [n for shard in plan for n in shard] == [n for n, _ in sizes]  # order kept, nothing lost
    size = dict(sizes)
    for shard in plan:
        assert sum(size[n] for n in shard) <= 100 or len(shard) == 1
    assert script.plan_shards(sizes, 10**9) == [[n for n, _ in sizes]]
    assert script.shard_file_names(1) == [WEIGHTS_NAME]
    assert script.shard_file_names(2)[1] == "diffusion_pytorch_model-00002-of-00002.safetensors"


def test_writer_streams_one_tensor_at_a_time(script, tmp_path):
    specs = [script.TensorSpec(f"t{i}", (64, 32), torch.bfloat16, "normal") for i in range(5)]
    alive: list[weakref.ref] = []

    def make(spec):
        assert all(ref() is None for ref in alive), "a previous tensor is still held while the next is made"
        t = script.make_tensor(spec, 0, {})
        alive.append(weakref.ref(t))
        return t

    path = tmp_path / "x.safetensors"
    script.write_safetensors(path, specs, make)
    back = load_file(path)
    assert set(back) == {s.name for s in specs}
    for s in specs:
        assert torch.equal(back[s.name], script.make_tensor(s, 0, {}))


def test_script_writes_a_loadable_sharded_checkpoint(script, tmp_path):
    from diffusers import UNet2DConditionModel

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}))
    out = tmp_path / "out"
    args = ["--family", "sd15", "--config-json", str(config), "--seed", "3", "--no-progress"]
    assert script.main([*args, "--out", str(out), "--max-shard-gb", "0.0002"]) == 0
    index = json.loads((out / "unet" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 3
    with open_checkpoint(out / "unet") as reader:
        per_file: dict[Path, list[int]] = {}
        for name in reader.keys():
            per_file.setdefault(reader.file_of(name), []).append(reader.nbytes(name))
    assert all(sum(sizes) <= 200_000 or len(sizes) == 1 for sizes in per_file.values())

    loaded = UNet2DConditionModel.from_pretrained(out, subfolder="unet", torch_dtype=torch.float16)
    expected = _unet().state_dict()
    sd = loaded.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in expected.items()}
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in sd.values())
    assert float(sd["conv_in.weight"].float().std()) == pytest.approx(0.02, rel=0.2)
    assert not sd["conv_in.bias"].any() and bool((sd["conv_norm_out.weight"] == 1).all())
    with open_checkpoint(out / "unet") as reader:
        for name, tensor in iter_tensors(reader):
            assert tensor.dtype == torch.float16 and torch.equal(tensor, sd[name])

    # the same seed gives the same values whatever the sharding; --single-file writes one file of diffusers names
    single = tmp_path / "one.safetensors"
    assert script.main([*args, "--out", str(single), "--single-file", "--dtype", "fp16"]) == 0
    with open_checkpoint(single) as reader:
        assert set(reader.keys()) == set(sd) and torch.equal(reader.get("conv_in.weight"), sd["conv_in.weight"])
