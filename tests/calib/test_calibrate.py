"""qdiff.calibrate / qdiff calibrate end to end on tiny-sd; the plan's bits as measured from frozen buffers."""

from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

import qdiff
from qdiff.calib.allocate import measured_weight_bits
from qdiff.calib.run import CalibrationResult
from qdiff.cli import main
from qdiff.config.recipe import Recipe
from qdiff.models.tiny import tiny_sd_pipeline


def _recipe() -> Recipe:
    r = Recipe.load("mixdq-w4a8")
    return r.replace(
        name="tiny-mixdq",
        sampler=dataclasses.replace(r.sampler, steps=2),
        calibration=dataclasses.replace(r.calibration, num_prompts=2, batch_size=2),
        # 3-bit candidates are stored in nibbles: the budget must count them as 4 bits
        sensitivity=dataclasses.replace(r.sensitivity, proxy="local", w_bits_content=(2, 3, 8), fast_prompts=1),
        allocation=dataclasses.replace(r.allocation, w_budget=3.9, a_budget=7.0),
    )


def test_api_plan_meets_budget_measured_from_frozen_bytes():
    recipe = _recipe()
    result = qdiff.calibrate(tiny_sd_pipeline(seed=0), recipe, progress=False)
    assert isinstance(result, CalibrationResult)
    meta = result.plan.meta
    assert meta["achieved_w_bits"] <= 3.9 + 1e-6 and meta["achieved_a_bits"] <= 7.0 + 1e-6
    assert meta["solver_status"] == {"weights": "Optimal", "activations": "Optimal"}
    bits = {b.w_bits for b in result.plan.layers.values()}
    assert 3 in bits, "test needs a 3-bit layer to check storage accounting"
    assert meta["achieved_w_bits_nominal"] < meta["achieved_w_bits"]  # 3 nominal bits cost 4 stored
    assert len(result.table.rows) == len(result.plan.layers)
    pipe = tiny_sd_pipeline(seed=0)
    qdiff.quantize(pipe, recipe, plan=result.plan, ranges=result.stats, progress=False)
    measured = measured_weight_bits(pipe.unet)
    assert measured["storage_bits"] == pytest.approx(meta["achieved_w_bits"], abs=1e-12)
    assert measured["with_scales_bits"] > measured["storage_bits"]  # scales are extra, reported separately
    a = [m.qcfg.a_bits for m in qdiff.quant.transform.quantized_layers(pipe.unet).values()]
    assert 4 in a  # activation budget 7 forces some int4 inputs


def test_cli_calibrate_then_quantize_with_calib(tmp_path, capsys):
    recipe_path = tmp_path / "r.yaml"
    _recipe().save(recipe_path)
    out = tmp_path / "calib"
    argv = [
        "calibrate",
        "--model",
        "builtin:tiny-sd",
        "--recipe",
        str(recipe_path),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"plan.json", "ranges.json", "ranges.safetensors", "sensitivity.json", "sensitivity.csv"} <= names
    assert {"sensitivity.png", "sensitivity.jsonl", "recipe.yaml", "calibrate.log"} <= names
    assert not (tmp_path / "calib.partial").exists()
    assert Image.open(out / "sensitivity.png").format == "PNG"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == "qdiff-plan" and plan["meta"]["w_budget"] == 3.9
    assert main(argv) == 1 and "already exists" in capsys.readouterr().err
    q = tmp_path / "q"
    assert main(["quantize", "--model", "builtin:tiny-sd", "--calib", str(out), "--out", str(q), "--no-progress"]) == 0
    manifest = json.loads((q / "qdiff.json").read_text())
    assert manifest["recipe"]["name"] == "tiny-mixdq" and manifest["plan"]["meta"]["w_budget"] == 3.9
    assert any(e.get("bos") == "cached" for e in manifest["layers"].values())
    loaded = qdiff.load(q)
    assert measured_weight_bits(loaded.unet)["storage_bits"] == pytest.approx(
        plan["meta"]["achieved_w_bits"], abs=1e-12
    )
