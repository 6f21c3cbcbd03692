"""Streaming quantization (qdiff.export.stream) against the in-memory path, sharded exports, mapped loading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdiff
from qdiff.calib.stats import CapturedStats, LayerStats
from qdiff.config.plan import LayerBits, Plan
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.export.checkpoint import CheckpointReader, open_checkpoint
from qdiff.export.load import load_denoiser_export
from qdiff.export.resolve import load_pipeline
from qdiff.export.stream import can_stream, stream_quantize
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.quant.split import part_keys
from qdiff.quant.transform import layer_specs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """builtin name -> a diffusers pipeline folder written by save_pretrained (made on first use)."""
    root, made = tmp_path_factory.mktemp("sources"), {}

    def get(name: str) -> Path:
        if name not in made:
            load_pipeline(f"builtin:{name}").save_pretrained(root / name)
            made[name] = root / name
        return made[name]

    return get


def _in_memory(src: Path, recipe, out: Path, **kwargs) -> Path:
    return qdiff.save(qdiff.quantize(load_pipeline(str(src)), recipe, progress=False, **kwargs), out)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "qdiff.json").read_text())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    m = _manifest(folder)
    with open_checkpoint(folder / m["denoiser"]["weights"]) as reader:
        return {k: reader.get(k) for k in reader.keys()}


def _assert_same_export(streamed: Path, in_memory: Path) -> None:
    a, b = _manifest(streamed), _manifest(in_memory)
    for key in ("layers", "recipe", "plan", "torch_dtype", "denoiser", "pipeline_class", "base_model", "schedule"):
        assert a[key] == b[key], key
    ta, tb = _tensors(streamed), _tensors(in_memory)
    assert ta.keys() == tb.keys()
    for key, t in ta.items():
        assert t.dtype == tb[key].dtype and torch.equal(t, tb[key]), key


def _images(folder: Path, **kwargs) -> torch.Tensor:
    pipe = qdiff.load(folder, device="cpu")
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, generator=generator, output_type="pt",
                height=32, width=32, **kwargs).images  # fmt: skip


def _recipe_with_scheduler(name: str, scheduler: str, spacing: str | None = None) -> Recipe:
    data = Recipe.load(name).to_dict()
    data["sampler"].update(scheduler=scheduler, **({"timestep_spacing": spacing} if spacing else {}))
    return Recipe.from_dict(data)


# --- streamed == in memory, every family ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, recipe",
    [
        ("tiny-sd", "w8a8"),
        ("tiny-sdxl", "sched:w4a8"),  # with a scheduler swap (euler_a, trailing), applied to the copied scheduler
        ("tiny-pixart", "w4a8"),
        ("tiny-flux-schnell", "w4a8"),
        ("tiny-sd3", "w8a8"),
    ],
)
def test_streamed_export_equals_in_memory(sources, tmp_path, name, recipe):
    src = sources(name)
    if recipe.startswith("sched:"):
        recipe = _recipe_with_scheduler(recipe.removeprefix("sched:"), "euler_a", "trailing")
    streamed = stream_quantize(src, recipe, tmp_path / "streamed", progress=False)
    in_memory = _in_memory(src, recipe, tmp_path / "memory")
    _assert_same_export(streamed, in_memory)
    weights = _manifest(streamed)["denoiser"]["weights"]  # one writer for both paths: the same bytes
    assert (streamed / weights).read_bytes() == (in_memory / weights).read_bytes()
    for rel in ("model_index.json", "scheduler/scheduler_config.json"):
        a, b = (json.loads((f / rel).read_text()) for f in (streamed, in_memory))
        assert a == b, rel
    assert sorted(_manifest(streamed)["files"]) == sorted(_manifest(in_memory)["files"])
    assert torch.equal(_images(streamed), _images(in_memory))


def _static_ranges(pipe, recipe: Recipe) -> CapturedStats:
    """Synthetic captured statistics for every layer (per part for split layers), as qdiff calibrate records them."""
    _, den = find_denoiser(pipe)
    specs = layer_specs(get_adapter(den).layers(den), recipe)
    g = torch.Generator().manual_seed(0)
    layers, split = {}, {}
    for i, (name, q) in enumerate(specs.items()):
        keys = (name, *part_keys(name)) if q.a_split is not None else (name,)
        split.update({name: q.a_split} if q.a_split is not None else {})
        for j, key in enumerate(keys):
            st = LayerStats()
            for step in range(2):
                st.update(torch.randn(64, generator=g) * (1 + i % 5 + j), step)
            layers[key] = st
    return CapturedStats(layers, {"split_layers": split})


def test_static_ranges_and_plan_stream_like_in_memory(sources, tmp_path):
    src = sources("tiny-sd")
    recipe = Recipe.load("w8a8-static")
    ranges = _static_ranges(load_pipeline(str(src)), recipe)
    assert any("#" in k for k in ranges.layers)  # split layers (two activation ranges) are covered
    assert can_stream(recipe, None, ranges)[0] and not can_stream(recipe)[0]
    streamed = stream_quantize(src, recipe, tmp_path / "s", ranges=ranges, progress=False)
    _assert_same_export(streamed, _in_memory(src, recipe, tmp_path / "m", ranges=ranges))

    names = list(_manifest(streamed)["layers"])
    plan = Plan({n: LayerBits(w_bits=(8, 4, 2)[i % 3], a_bits=None if i % 4 == 0 else 8) for i, n in
                 enumerate(names[::2])})  # fmt: skip
    recipe = Recipe.load("w4a8")
    streamed = stream_quantize(src, recipe, tmp_path / "ps", plan=plan, progress=False)
    _assert_same_export(streamed, _in_memory(src, recipe, tmp_path / "pm", plan=plan))
    assert len(_manifest(streamed)["layers"]) == len(plan.layers)


def test_float16_checkpoint_read_as_stored_or_cast(sources, tmp_path):
    """A float16 folder streams like the in-memory path on the pipeline loaded in float16, or in float32 with
    ``dtype`` (float parts cast first, as ``load_pipeline(torch_dtype=...)``)."""
    src = tmp_path / "fp16"
    load_pipeline(str(sources("tiny-sd")), torch_dtype="float16").save_pretrained(src)
    for dtype in (None, "float32"):
        streamed = stream_quantize(src, "w8a8", tmp_path / f"s-{dtype}", dtype=dtype, progress=False)
        in_memory = qdiff.save(qdiff.quantize(load_pipeline(str(src), torch_dtype=dtype or "float16"), "w8a8",
                                              progress=False), tmp_path / f"m-{dtype}")  # fmt: skip
        _assert_same_export(streamed, in_memory)
        tensors = _tensors(streamed)
        assert _manifest(streamed)["torch_dtype"] == (dtype or "float16")
        assert tensors["conv_in.weight"].dtype == (torch.float32 if dtype else torch.float16)  # a float-kept layer
        assert tensors["time_embedding.linear_1.qweight"].dtype == torch.int8


# --- sharding, mapped loading ---------------------------------------------------------------------------------------


def test_sharded_export_hashes_every_shard_and_loads(sources, tmp_path, monkeypatch):
    src = sources("tiny-sd")
    one = stream_quantize(src, "w8a8", tmp_path / "one", progress=False)
    many = stream_quantize(src, "w8a8", tmp_path / "many", progress=False, max_shard_bytes=60_000)
    m = _manifest(many)
    assert m["denoiser"]["weights"] == "unet/qdiff.safetensors.index.json"
    shards = sorted(p.name for p in (many / "unet").glob("qdiff-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (many / "unet" / "qdiff.safetensors").exists()
    assert {f"unet/{s}" for s in shards} | {"unet/qdiff.safetensors.index.json"} <= set(m["files"])
    ta, tb = _tensors(one), _tensors(many)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    from qdiff.eval.size import export_report  # qdiff inspect reads the shards through the index

    def report(folder: Path) -> list[str]:  # the layer table and totals: all but the folder and file-count lines
        return [ln for ln in export_report(folder).split("\n") if not ln.startswith(("export ", "recipe "))]

    assert report(many) == report(one) and len(report(one)) > 10

    # mapped loading: the denoiser's tensors are read one by one from the shards, each once
    reads: list[str] = []
    get = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, key: reads.append(key) or get(self, key))
    images = _images(many)
    assert sorted(reads) == sorted(ta)  # the denoiser's tensors, each once
    monkeypatch.undo()
    assert torch.equal(images, _images(one))

    (many / "unet" / shards[1]).unlink()
    with pytest.raises(QdiffError, match=rf"unet/{shards[1]}: listed in qdiff.json but missing"):
        qdiff.load(many)


def test_in_memory_save_shards_too(sources, tmp_path):
    src = sources("tiny-sd")
    pipe = qdiff.quantize(load_pipeline(str(src)), "w8a8", progress=False)
    out = qdiff.save(pipe, tmp_path / "one")
    from qdiff.export.save import save_quantized

    many = save_quantized(pipe, tmp_path / "many", max_shard_bytes=60_000)
    assert _manifest(many)["denoiser"]["weights"] == "unet/qdiff.safetensors.index.json"
    ta, tb = _tensors(out), _tensors(many)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# --- memory: one float layer at a time ------------------------------------------------------------------------------


def test_at_most_one_float_layer_is_alive(sources, tmp_path, monkeypatch):
    alive: list[weakref.ref] = []  # storages of every tensor read from the checkpoint (a Parameter shares it)
    peak = [0]
    get = CheckpointReader.get

    def spy(self, key):
        t = get(self, key)
        alive.append(weakref.ref(t.untyped_storage()))
        peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
        return t

    monkeypatch.setattr(CheckpointReader, "get", spy)
    out = stream_quantize(sources("tiny-sdxl"), "w4a8", tmp_path / "out", progress=False)
    with open_checkpoint(sources("tiny-sdxl") / "unet") as reader:
        assert len(alive) == len(reader)  # every tensor read exactly once
    assert peak[0] == 2  # a layer's weight and bias, nothing else
    assert all(ref() is None for ref in alive)
    assert (out / "qdiff.json").is_file()


# --- atomic: a kill leaves no output --------------------------------------------------------------------------------

_KILLED = """
import sys, time
from pathlib import Path
from qdiff.export import stream

src, out, marker = map(Path, sys.argv[1:4])
quantize_layer, done = stream._Job._quantize_layer, []

def slow(self, *args):
    quantize_layer(self, *args)
    done.append(1)
    if len(done) == 5:
        marker.write_text("5 layers written")
        time.sleep(120)

stream._Job._quantize_layer = slow
stream.stream_quantize(src, "w8a8", out, progress=False)
"""


def test_kill_during_export_leaves_no_output(sources, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(sources("tiny-sd")), str(out), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the export process ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(partial) == 1 and list((partial[0] / "unet").glob("*.partial"))  # killed mid-write, never renamed


# --- denoiser-only and single-file sources --------------------------------------------------------------------------


def test_denoiser_folder_and_single_file(sources, tmp_path):
    src = sources("tiny-sd")
    out = stream_quantize(src / "unet", "w8a8", tmp_path / "den", progress=False)
    m = _manifest(out)
    assert m["denoiser_only"] is True and m["pipeline_class"] is None
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "qdiff.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/qdiff.safetensors",
    ]  # fmt: skip
    with pytest.raises(QdiffError, match="holds only the denoiser"):
        qdiff.load(out)

    single = tmp_path / "unet.safetensors"
    save_file(load_file(src / "unet" / "diffusion_pytorch_model.safetensors"), str(single))
    with pytest.raises(QdiffError, match="needs the denoiser's config.json"):
        stream_quantize(single, "w8a8", tmp_path / "x", progress=False)
    from_file = stream_quantize(single, "w8a8", tmp_path / "file", config=src, progress=False)
    ta, tb = _tensors(out), _tensors(from_file)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    den = load_denoiser_export(out, device="cpu")
    ref = find_denoiser(qdiff.quantize(load_pipeline(str(src)), "w8a8", progress=False))[1]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 8, den.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        assert torch.equal(den(x, 10, ctx).sample, ref(x, 10, ctx).sample)


# --- refusals -------------------------------------------------------------------------------------------------------


def test_what_cannot_stream_says_why():
    base = Recipe.load("w8a8").to_dict()
    assert can_stream(Recipe.load("w8a8")) == (True, "dynamic activations: no forward pass of the float model")
    cases = {
        "bos_aware": ({"bos_aware": True}, "BOS probe"),
        "text": ({"text_encoders": {"clip": "w8a8"}}, "quantizes a text encoder"),
        "qsched": ({"qsched": {**base["qsched"], "enabled": True}}, "Q-Sched"),
        "static": ({"activations": {"bits": 8, "mode": "static"}}, "ranges from a calibration run"),
    }
    for change, reason in cases.values():
        recipe = Recipe.from_dict({**base, **change})
        ok, why = can_stream(recipe)
        assert not ok and reason in why
        with pytest.raises(QdiffError, match=f"cannot stream this quantization: .*{reason}"):
            stream_quantize("unused", recipe, "unused")
    kept_float = Recipe.from_dict({**base, "activations": {"bits": 16, "mode": "static"}})
    assert can_stream(kept_float)[0]  # nothing to calibrate: weight-only


def test_output_never_overlaps_the_source(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources("tiny-sd"), src)
    for out in (src, src / "export", src / "unet", tmp_path):
        with pytest.raises(QdiffError, match="overlaps the source"):
            stream_quantize(src, "w8a8", out, overwrite=True, progress=False)
    assert (src / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_pickle_file_in_the_source_is_refused(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources("tiny-sd"), src)
    (src / "text_encoder" / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(QdiffError, match=r"text_encoder/pytorch_model\.bin: refusing to load a \.bin file"):
        stream_quantize(src, "w8a8", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written


def test_missing_shard_and_nan_weight_name_the_file_and_layer(sources, tmp_path):
    pipe = load_pipeline(str(sources("tiny-sd")))
    pipe.unet.save_pretrained(tmp_path / "unet", max_shard_size="100KB")
    shard = sorted((tmp_path / "unet").glob("*-00002-of-*.safetensors"))[0]
    keep = shard.read_bytes()
    shard.unlink()
    with pytest.raises(QdiffError, match=rf"{shard.name}: shard named by .*index.json is missing"):
        stream_quantize(tmp_path / "unet", "w8a8", tmp_path / "out", progress=False)
    shard.write_bytes(keep)

    layer = "down_blocks.0.attentions.0.proj_in"
    path = next(p for p in (tmp_path / "unet").glob("*.safetensors") if f"{layer}.weight" in load_file(p))
    tensors = load_file(path)
    tensors[f"{layer}.weight"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(QdiffError, match=rf"tensor '{layer}.weight' of layer '{layer}' has 1 NaN value"):
        stream_quantize(tmp_path / "unet", "w8a8", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # temp folder removed
