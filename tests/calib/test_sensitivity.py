"""Sensitivity: one layer at a time, scores vs an independent quantize+generate, resumable journal, Spearman."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import qdiff
from qdiff.calib.capture import collecting_outputs
from qdiff.calib.metrics import sqnr_db, ssim
from qdiff.calib.sensitivity import analyze, quantized_one, spearman
from qdiff.config.plan import LayerBits, Plan
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.models.tiny import tiny_sd_pipeline
from qdiff.sampling.draw import draw
from qdiff.sampling.prompts import load_prompts

CONTENT = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
QUALITY = "down_blocks.0.resnets.0.conv1"
LAYERS = [
    QUALITY,
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    CONTENT,
]


def _recipe(mode: str = "fast", proxy: str = "gain", **sens) -> Recipe:
    r = Recipe.load("w8a8")
    return r.replace(
        sampler=dataclasses.replace(r.sampler, steps=2),
        calibration=dataclasses.replace(r.calibration, num_prompts=2, batch_size=2),
        sensitivity=dataclasses.replace(r.sensitivity, mode=mode, proxy=proxy, num_prompts=2, fast_prompts=2, **sens),
    )


def test_quantized_one_matches_float64_reference_and_restores(gen):
    pipe = tiny_sd_pipeline(seed=0)
    layer = pipe.unet.get_submodule(QUALITY)
    w = layer.weight.detach().clone()
    with quantized_one(layer, "w", 4, _recipe()):
        w2d = w.double().reshape(w.shape[0], -1)
        scale = w2d.abs().amax(dim=1, keepdim=True) / 7.0  # symmetric int4, per output channel, min-max
        ref = (torch.clamp(torch.round(w2d / scale), -7, 7) * scale).reshape(w.shape)
        torch.testing.assert_close(layer.weight.double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(layer.weight, w) and not layer._forward_pre_hooks and not layer._forward_hooks
    x = torch.randn(2, *[32, 8, 8], generator=gen)
    with quantized_one(layer, "a", 8, _recipe()):
        y = layer(x)
    xq = torch.zeros_like(x)  # dynamic symmetric int8 per sample for convs
    for i in range(2):
        s = x[i].abs().max().double() / 127.0
        xq[i] = (torch.clamp(torch.round(x[i].double() / s), -127, 127) * s).float()
    torch.testing.assert_close(y, torch.nn.functional.conv2d(xq, w, layer.bias, padding=1), rtol=1e-5, atol=1e-5)
    assert not layer._forward_pre_hooks


def test_full_mode_scores_match_independent_quantized_pipeline():
    """Full-mode scores == SSIM / SQNR of a pipeline quantized by qdiff.quantize with a one-layer plan."""
    recipe = _recipe("full").replace(sensitivity=dataclasses.replace(_recipe("full").sensitivity, a_bits=(8,)))
    table = analyze(tiny_sd_pipeline(seed=0), recipe, layers=[CONTENT, QUALITY], progress=False)
    prompts = load_prompts("coco", 2)
    for name, metric in ((CONTENT, "ssim"), (QUALITY, "sqnr")):
        row = table.row(name)
        assert row["metric"] == metric
        fp_pipe, q_pipe = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=0)
        qdiff.quantize(q_pipe, recipe, plan=Plan({name: LayerBits(4, None)}), progress=False)
        got = []
        for p in (fp_pipe, q_pipe):
            with collecting_outputs(p.unet) as outs:
                images = draw(p, prompts, None, recipe.sampler, 2)
            got.append((images, torch.cat([o.reshape(-1) for o in outs])))
        ref = float(ssim(got[0][0], got[1][0]).mean()) if metric == "ssim" else sqnr_db(got[0][1], got[1][1])
        assert row["w"]["4"] == pytest.approx(ref, abs=1e-3 if metric == "ssim" else 0.2)
        assert row["w"]["8"] > row["w"]["4"]  # more bits, less damage


def test_resume_after_interruption_gives_identical_table(tmp_path):
    journal = tmp_path / "sensitivity.jsonl"
    recipe = _recipe()

    class Killed(Exception):
        pass

    def die_after_two(row, seen=[]):  # noqa: B006 - per-test counter
        seen.append(row["name"])
        if len(seen) == 2:
            raise Killed  # like kill -9 right after the second row hit the disk

    with pytest.raises(Killed):
        analyze(tiny_sd_pipeline(seed=0), recipe, journal=journal, layers=LAYERS, progress=False, on_row=die_after_two)
    lines = journal.read_text().splitlines()
    assert len(lines) == 3 and "header" in json.loads(lines[0])
    with open(journal, "a") as f:
        f.write('{"name": "down_blocks.0.attentions.0.tra')  # a write torn by the kill
    resumed = analyze(tiny_sd_pipeline(seed=0), recipe, journal=journal, layers=LAYERS, progress=False)
    fresh = analyze(tiny_sd_pipeline(seed=0), recipe, layers=LAYERS, progress=False)
    assert resumed.meta["resumed_rows"] == 2
    assert resumed.rows == fresh.rows and sorted(r["name"] for r in resumed.rows) == sorted(LAYERS)
    assert all(set(r["w"]) and set(r["a"]) == {"4", "8"} for r in fresh.rows)
    assert len(journal.read_text().splitlines()) == 1 + len(LAYERS)
    other = _recipe(a_bits=(8,))
    with pytest.raises(QdiffError, match="different run"):
        analyze(tiny_sd_pipeline(seed=0), other, journal=journal, layers=LAYERS, progress=False)


def test_table_csv_and_bos_layers():
    table = analyze(
        tiny_sd_pipeline(seed=0), _recipe("fast", "local").replace(bos_aware=True), layers=LAYERS, progress=False
    )
    assert table.meta["bos_layers"] == [LAYERS[2]]
    csv = table.to_csv().splitlines()
    assert csv[0] == "name,group,kind,params,act_numel,metric,w2,w4,w8,a4,a8" and len(csv) == 1 + len(LAYERS)
    assert table.row(CONTENT)["w"].keys() == {"2", "4", "8"} and table.row(QUALITY)["w"].keys() == {"4", "8"}


def test_spearman_against_hand_computed_values():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2.0))  # average ranks for ties
    assert spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1], [1, 2]))
