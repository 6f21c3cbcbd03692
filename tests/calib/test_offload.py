"""Bounded-memory calibration: offloaded runs give the non-offloaded run's ranges, table and plan, exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qdiff
from qdiff.calib.offload import BlockOffload, block_names, get_offload, load_offloaded, offloaded, on_device
from qdiff.cli import main
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.export.resolve import load_pipeline, place
from qdiff.models.adapters import find_denoiser


def _recipe(name: str, mode: str = "fast", proxy: str = "local", offload: str = "none", skip=()) -> Recipe:
    r = Recipe.load(name)
    return r.replace(
        skip=(*r.skip, *skip),
        name=f"tiny-{name}",
        sampler=dataclasses.replace(r.sampler, steps=2),
        calibration=dataclasses.replace(r.calibration, num_prompts=2, batch_size=2, offload=offload),
        sensitivity=dataclasses.replace(r.sensitivity, mode=mode, proxy=proxy, fast_prompts=1, num_prompts=1),
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """builtin -> float pipeline folder (written once)."""
    root, cache = tmp_path_factory.mktemp("offload"), {}

    def get(name: str):
        if name not in cache:
            cache[name] = root / name
            load_pipeline(f"builtin:{name}").save_pretrained(cache[name])
        return cache[name]

    return get


def _offload(recipe: Recipe, mode: str) -> Recipe:
    return recipe.replace(calibration=dataclasses.replace(recipe.calibration, offload=mode))


def _same_result(a, b) -> None:
    """Ranges (every statistic), sensitivity rows and plan equal, bit for bit."""
    assert a.stats.layers.keys() == b.stats.layers.keys()
    for key in a.stats.layers:
        sa, sb = vars(a.stats.layers[key]), vars(b.stats.layers[key])
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            assert torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k], (key, k)
    assert a.table.rows == b.table.rows
    assert a.plan.to_dict()["layers"] == b.plan.to_dict()["layers"]


def _aligned(pipe):
    """The denoiser's tensors in fresh (64-byte aligned) buffers, as the offloaded reads give them. diffusers' load
    leaves them at the 8-byte offsets of the safetensors file, and oneDNN / MKL block differently on those: the
    sensitivity scores then differ in the last float32 bits (the plan and ranges do not)."""
    for t in find_denoiser(pipe)[1].parameters():
        t.data = t.data.clone()
    return pipe


def _float_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in find_denoiser(pipe)[1].state_dict().items()}


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-pixart"])
def test_sequential_offload_from_disk_equals_in_memory(folders, name):
    """The CLI path: blocks never loaded whole (read from the checkpoint per forward) -> identical artifacts."""
    folder = folders(name)
    recipe = _recipe("mixdq-w4a8")
    ref = qdiff.calibrate(_aligned(load_pipeline(str(folder))), recipe, progress=False)
    pipe = load_offloaded(str(folder))
    place(pipe, "cpu", "float32")
    on_device(pipe)
    den = find_denoiser(pipe)[1]
    off = get_offload(den)
    assert isinstance(off, BlockOffload) and off.blocks and list(off.blocks) == block_names(den)
    assert all(p.is_meta for b in off.blocks.values() for p in b.parameters())  # nothing materialised yet
    seen = []
    peak = {"n": 0}

    def count(_m, _a):
        live = [n for n, c in off.count.items() if c > 0]
        peak["n"] = max(peak["n"], len(live))
        seen.append(len(live))

    handles = [b.register_forward_pre_hook(count) for b in off.blocks.values()]
    got = qdiff.calibrate(pipe, _offload(recipe, "sequential"), progress=False)
    for h in handles:
        h.remove()
    _same_result(got, ref)
    assert seen and peak["n"] <= 2  # at most one pinned block and the one running
    assert all(p.is_meta for b in off.blocks.values() for p in b.parameters())  # released again


def test_sequential_offload_of_an_in_memory_pipeline_full_mode_restores_it(folders):
    """The API path (a temp safetensors copy of the blocks), full sensitivity mode; the pipeline comes back whole."""
    folder = folders("tiny-sd")
    recipe = _recipe("mixdq-w4a8", mode="full", skip=("up_blocks.*", "*attn*", "*ff*", "*proj*", "time_*"))
    ref = qdiff.calibrate(_aligned(load_pipeline(str(folder))), recipe, progress=False)
    pipe = _aligned(load_pipeline(str(folder)))
    before = _float_state(pipe)
    got = qdiff.calibrate(pipe, _offload(recipe, "sequential"), progress=False)
    _same_result(got, ref)
    after = find_denoiser(pipe)[1]
    assert get_offload(after) is None and "_apply" not in vars(after.down_blocks[0])
    for k, v in after.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_model_offload_equals_in_memory(folders):
    folder = folders("tiny-sd")
    recipe = _recipe("mixdq-w4a8", proxy="local")
    ref = qdiff.calibrate(_aligned(load_pipeline(str(folder))), recipe, progress=False)
    pipe = _aligned(load_pipeline(str(folder)))
    with offloaded(pipe, "model"):
        got = qdiff.calibrate(pipe, recipe, progress=False)
    _same_result(got, ref)
    _same_result(qdiff.calibrate(pipe, recipe, progress=False, offload="model"), ref)  # the API argument


def test_cli_offload_flag_writes_the_same_plan(folders, tmp_path, capsys):
    folder = folders("tiny-sd")
    recipe_path = tmp_path / "r.yaml"
    _recipe("mixdq-w4a8", proxy="local").save(recipe_path)
    outs = {}
    for mode in ("none", "sequential"):
        outs[mode] = tmp_path / mode
        argv = ["calibrate", "--model", str(folder), "--recipe", str(recipe_path), "--out", str(outs[mode])]
        assert main([*argv, "--offload", mode, "--no-progress"]) == 0
    plans = [json.loads((outs[m] / "plan.json").read_text())["layers"] for m in outs]
    assert plans[0] == plans[1]
    assert (outs["none"] / "ranges.safetensors").read_bytes() == (
        outs["sequential"] / "ranges.safetensors"
    ).read_bytes()
    rows = [json.loads((outs[m] / "sensitivity.json").read_text())["rows"] for m in outs]
    assert [r["name"] for r in rows[0]] == [r["name"] for r in rows[1]]
    for a, b in zip(*rows):  # the in-memory CLI run keeps diffusers' unaligned buffers (see _aligned): last-bit
        for kind in ("w", "a"):  # differences, which can move a value across a quantization step (~1e-3 dB)
            assert a[kind].keys() == b[kind].keys()
            for bits in a[kind]:
                assert b[kind][bits] == pytest.approx(a[kind][bits], rel=1e-3), (a["name"], kind, bits)


def test_offload_errors_name_the_setting(folders):
    with pytest.raises(QdiffError, match=r"recipe: calibration.offload: got 'disk', allowed values"):
        dataclasses.replace(Recipe.load("w8a8").calibration, offload="disk")
    with pytest.raises(QdiffError, match=r"--offload sequential: .* is not a diffusers pipeline folder"):
        load_offloaded(str(folders("tiny-sd") / "unet"))
