"""Two gloo ranks under torchrun on tiny-sd give the single-process artifacts; a killed rank resumes; a failing
rank stops every rank with one error line and no output folder."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qdiff.config.recipe import Recipe

QDIFF = shutil.which("qdiff") or str(Path(sys.executable).with_name("qdiff"))
# three layers keep full-mode sensitivity to 14 pipeline runs: the BOS-aware cross-attention K/V (content, SSIM)
# and one quality layer (SQNR)
SKIP = (
    "down_blocks.*",
    "up_blocks.*",
    "time_embedding.*",
    "mid_block.resnets.*",
    "*attn1*",
    "*ff.*",
    "*proj_in",
    "*to_q",
    "*to_out*",
)


def _recipe(tmp: Path) -> Path:
    r = Recipe.load("mixdq-w4a8")
    r = r.replace(
        name="tiny-dist",
        sampler=dataclasses.replace(r.sampler, steps=2),
        calibration=dataclasses.replace(r.calibration, num_prompts=4, batch_size=1),
        sensitivity=dataclasses.replace(r.sensitivity, mode="full", num_prompts=1, w_bits_content=(2, 3, 8)),
        allocation=dataclasses.replace(r.allocation, w_budget=4.5, a_budget=7.0),
        skip=SKIP,
    )
    path = tmp / "recipe.yaml"
    r.save(path)
    return path


def _torchrun(args: list[str], hook: str | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QDIFF_DIST_TIMEOUT": "120"}
    env.pop("QDIFF_DIST_TEST_HOOK", None)
    if hook:
        env["QDIFF_DIST_TEST_HOOK"] = hook
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "--no-python",
           QDIFF, *args, "--no-progress"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process calibration (in this process) of the test recipe."""
    from qdiff.cli import main

    tmp = tmp_path_factory.mktemp("dist")
    recipe = _recipe(tmp)
    assert main(["calibrate", "--model", "builtin:tiny-sd", "--recipe", str(recipe), "--out", str(tmp / "one"),
                 "--no-progress"]) == 0  # fmt: skip
    return tmp, recipe


def _same_calibration(a: Path, b: Path) -> None:
    plan_a, plan_b = (json.loads((d / "plan.json").read_text()) for d in (a, b))
    assert plan_a["layers"] == plan_b["layers"]  # per-layer bits
    rows_a, rows_b = (json.loads((d / "sensitivity.json").read_text())["rows"] for d in (a, b))
    assert rows_a == rows_b  # scores: identical floats (same batches, same seeds, one thread per rank)
    assert (a / "ranges.safetensors").read_bytes() == (b / "ranges.safetensors").read_bytes()
    assert json.loads((a / "ranges.json").read_text()) == json.loads((b / "ranges.json").read_text())


def test_calibrate_killed_rank_then_rerun_equals_one_process(reference):
    tmp, recipe = reference
    out = tmp / "two"
    argv = ["calibrate", "--model", "builtin:tiny-sd", "--recipe", str(recipe), "--out", str(out)]
    dead = _torchrun(argv, hook="1:3:exit")  # rank 1 dies after logging 3 sensitivity items
    assert dead.returncode != 0 and not out.exists()
    logs = sorted((tmp / "two.partial" / "worklog").glob("sensitivity.rank*.jsonl"))
    before = sum(len(p.read_text().splitlines()) - 1 for p in logs)
    assert before >= 3
    ok = _torchrun(argv)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "2 ranks" in ok.stdout and "items resumed" in ok.stdout
    _same_calibration(tmp / "one", out)
    rows = json.loads((out / "sensitivity.json").read_text())["rows"]
    items = sum(len(r["w"]) + len(r["a"]) for r in rows)
    keys = [json.loads(line)["key"] for p in sorted((out / "worklog").glob("*.jsonl"))
            for line in p.read_text().splitlines()[1:]]  # fmt: skip
    assert len(keys) == len(set(keys)) == items  # every item scored exactly once over both runs
    meta = json.loads((out / "sensitivity.json").read_text())["meta"]
    assert meta["resumed_items"] == before and meta["ranks"] == 2


def test_calibrate_failing_rank_stops_all_with_one_error_and_no_output(reference):
    tmp, recipe = reference
    out = tmp / "fail"
    res = _torchrun(["calibrate", "--model", "builtin:tiny-sd", "--recipe", str(recipe), "--out", str(out)],
                    hook="1:1:raise")  # fmt: skip
    assert res.returncode != 0 and not out.exists()
    errors = [line for line in res.stderr.splitlines() if "qdiff: error:" in line]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "rank 1/2 failed in sensitivity" in errors[0] and "injected failure" in errors[0]


def test_eval_two_ranks_equals_one_process(reference):
    from qdiff.cli import main

    tmp, _ = reference
    argv = ["eval", "builtin:tiny-sd", "--num-prompts", "5", "--batch-size", "2", "--steps", "2", "--clip", "none",
            "--quality", "none"]  # fmt: skip
    assert main([*argv, "--out", str(tmp / "eval-one"), "--no-progress"]) == 0
    res = _torchrun([*argv, "--out", str(tmp / "eval-two")])
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (json.loads((tmp / d / "report.json").read_text())["metrics"] for d in ("eval-one", "eval-two"))
    for m in (one, two):
        for row in m.values():
            row.pop("s_per_image", None)  # a timing
    assert one == two
    assert res.stdout.count("| FP |") == 1  # rank 0 alone reports


def test_fit_schedule_two_ranks_picks_the_same_schedule(tmp_path):
    """Grid candidates are evaluated on both ranks (EvalCache.prefetch); the log and the schedule match one process."""
    import qdiff
    from qdiff.cli import main
    from qdiff.models.tiny import tiny_sd_pipeline

    data = {"name": "tiny-qsched", "quantize_protected": True, "sampler": {"steps": 2, "height": 32, "width": 32},
            "qsched": {"grid_size": 2, "num_prompts": 2, "heldout_prompts": 1, "alignment": "pyiqa:entropy",
                       "quality": "pyiqa:piqe", "k": 0.01, "log_alignment": True, "min_gain": 0.0}}  # fmt: skip
    recipe = Recipe.from_dict(data)
    export = tmp_path / "q"
    qdiff.save(qdiff.quantize(tiny_sd_pipeline(), recipe, progress=False), export)
    recipe.save(tmp_path / "r.yaml")
    (tmp_path / "p.txt").write_text("a red cat\na blue house\na green tree on a hill\n")
    common = [str(export), "--prompts", str(tmp_path / "p.txt"), "--recipe", str(tmp_path / "r.yaml")]
    assert main(["fit-schedule", *common, "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    res = _torchrun(["fit-schedule", *common, "--out", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "qdiff.json").read_text())["schedule"] for d in ("one", "two"))
    assert one == two
    logs = [(tmp_path / f"{d}.qsched-log.jsonl").read_text().splitlines() for d in ("one", "two")]
    entries = [{json.loads(x)["key"]: json.loads(x) for x in log[1:]} for log in logs]
    assert all(entries[1][k] == v for k, v in entries[0].items())  # same scores for every schedule both drew
