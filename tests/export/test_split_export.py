"""Split activation quantizers end to end on tiny-sd: static calibration per part, export round trip, ranges.json."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import generate

import qdiff
from qdiff.calib.capture import capture_stats
from qdiff.calib.stats import CapturedStats
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.models.adapters import get_adapter
from qdiff.models.tiny import tiny_sd_pipeline
from qdiff.quant.split import part_keys
from qdiff.quant.transform import layer_specs, quantized_layers


def _recipe(split_skip: bool = True) -> Recipe:
    r = Recipe.load("w8a8-static")
    return r.replace(
        sampler=dataclasses.replace(r.sampler, steps=2),
        calibration=dataclasses.replace(r.calibration, num_prompts=2, batch_size=2),
        activations=dataclasses.replace(r.activations, split_skip=split_skip),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pipe = qdiff.quantize(tiny_sd_pipeline(seed=3), _recipe(), progress=False)
    out = qdiff.save(pipe, tmp_path_factory.mktemp("split") / "model")
    return pipe, out, generate(pipe, seed=11)


def test_split_layers_are_the_adapter_splits(exported):
    pipe, out, _ = exported
    splits = get_adapter(pipe.unet).act_splits(tiny_sd_pipeline(seed=3).unet)
    layers = quantized_layers(pipe.unet)
    assert splits and {n: m.qcfg.a_split for n, m in layers.items() if m.qcfg.a_split} == splits
    for name in splits:
        assert layers[name].a_scale.shape == (2,) and bool(torch.isfinite(layers[name].a_scale).all())
    manifest = json.loads((out / "qdiff.json").read_text())
    assert {n: e["quant"]["a_split"] for n, e in manifest["layers"].items() if e["quant"]["a_split"]} == splits


def test_images_identical_after_load_with_split_intact(exported):
    pipe, out, images = exported
    loaded = qdiff.load(out)
    mine, theirs = quantized_layers(pipe.unet), quantized_layers(loaded.unet)
    assert {n: m.qcfg for n, m in theirs.items()} == {n: m.qcfg for n, m in mine.items()}
    assert all(torch.equal(theirs[n].a_scale, m.a_scale) for n, m in mine.items() if m.qcfg.a_split)
    assert torch.equal(generate(loaded, seed=11), images)


def test_manifest_without_a_split_key_still_loads(exported, tmp_path):
    """Format-1 exports written before the field existed have no ``a_split`` key (nor ``spec_version``): unsplit
    layers load as before. In format 2 every key is required."""
    import shutil

    dst = tmp_path / "old"
    shutil.copytree(exported[1], dst)
    path = dst / "qdiff.json"
    doc = json.loads(path.read_text())
    for entry in doc["layers"].values():
        del entry["quant"]["spec_version"]
        if entry["quant"]["a_split"] is None:
            del entry["quant"]["a_split"]
    path.write_text(json.dumps(doc))
    with pytest.raises(QdiffError, match=r"qdiff.json: layers\.\S+\.quant: format 2 writes spec_version 2, got None"):
        qdiff.load(dst)
    path.write_text(json.dumps({**doc, "format_version": 1}))
    loaded = qdiff.load(dst)
    assert torch.equal(generate(loaded, seed=11), exported[2])


def test_recipe_switch_and_plain_layers():
    unet = tiny_sd_pipeline(seed=3).unet
    infos = get_adapter(unet).layers(unet)
    on, off = layer_specs(infos, _recipe(True)), layer_specs(infos, _recipe(False))
    assert {n for n, q in on.items() if q.a_split} == {i.name for i in infos if i.a_split}
    assert not any(q.a_split for q in off.values())
    w8a16 = _recipe().replace(activations=dataclasses.replace(_recipe().activations, bits=16))
    assert not any(q.a_split for q in layer_specs(infos, w8a16).values())  # no activation quantizer, no split


def test_captured_ranges_per_part_and_old_stats(tmp_path):
    recipe = _recipe()
    pipe = tiny_sd_pipeline(seed=3)
    stats = capture_stats(pipe, recipe, progress=False)
    splits = stats.meta["split_layers"]
    assert splits == get_adapter(pipe.unet).act_splits(pipe.unet)
    stats.save(tmp_path / "new")
    back = CapturedStats.load(tmp_path / "new")
    name, split = next(iter(splits.items()))
    assert back.meta["split_layers"] == splits
    up, skip = (back.layers[k] for k in part_keys(name))
    assert up.numel_per_sample + skip.numel_per_sample == back.layers[name].numel_per_sample
    assert up.numel_per_sample * (pipe.unet.get_submodule(name).in_channels - split) == skip.numel_per_sample * split
    lo, hi = back.layers[name].minmax()  # the whole input's range covers both parts' ranges
    assert min(up.minmax()[0], skip.minmax()[0]) == lo and max(up.minmax()[1], skip.minmax()[1]) == hi
    qdiff.quantize(pipe, recipe, ranges=back, progress=False)
    layer = quantized_layers(pipe.unet)[name]
    act = recipe.activations
    expect = [st.qparams(act.observer, 8, False, act.percentile) for st in (up, skip)]
    assert layer.a_scale.tolist() == [float(e[0]) for e in expect]
    assert layer.a_zp.tolist() == [int(e[1]) for e in expect]
    # statistics captured before the split existed: no part keys, no meta entry
    old = CapturedStats({k: v for k, v in back.layers.items() if "#" not in k}, {**back.meta})
    del old.meta["split_layers"]
    old.save(tmp_path / "old")
    old = CapturedStats.load(tmp_path / "old")
    with pytest.raises(QdiffError, match="split_skip"):
        qdiff.quantize(tiny_sd_pipeline(seed=3), recipe, ranges=old, progress=False)
    plain = qdiff.quantize(tiny_sd_pipeline(seed=3), _recipe(False), ranges=old, progress=False)
    assert not any(m.qcfg.a_split for m in quantized_layers(plain.unet).values())
