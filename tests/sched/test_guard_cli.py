"""`qdiff fit-schedule` with the guards on a quantized tiny pipeline: validation metrics are printed, and a schedule
that wins JAQ by drifting the picture distribution is rejected (the plain scheduler kept, the export unchanged).

With prompt families (issue 25): families from k-means clusters of the pipeline's own text embeddings, the
per-family table printed, the decision written beside the log, and a kept schedule's export carrying the table."""

from __future__ import annotations

import json

import pytest
import torch

import qdiff
from qdiff.config.recipe import Recipe

PROMPTS = ["a red cat", "a blue house", "a green tree on a hill", "a cup", "a dog", "a tree", "a boat"]
FAMILY_PROMPTS = ["a red cat", "a blue house", "a green tree on a hill", "a cup of tea", "a dog in the snow",
                  "a tall tree", "a boat at sea", "a red car", "a small bird", "an old castle", "a bowl of fruit",
                  "a city"]  # fmt: skip
QSCHED = {"parameterisation": "per_step", "optimiser": "coordinate", "budget": 16, "num_prompts": 3,
          "heldout_prompts": 4, "alignment": "bright", "quality": "bright", "k": 0.0,
          "features": "pixels"}  # fmt: skip
FAMILIES = {**QSCHED, "budget": 12, "num_prompts": 4, "heldout_prompts": 6, "validation_seeds": 2, "guard": True,
            "families": ["embedding"], "family_clusters": 2, "bootstrap": 200}  # fmt: skip
RECIPE = {"name": "tiny-guard", "quantize_protected": True, "sampler": {"steps": 2, "height": 32, "width": 32},
          "qsched": QSCHED}  # fmt: skip


class Bright:
    """A scorer that rewards bright images: the search can only win it by moving the picture distribution."""

    name = "bright"

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return 1.0 + 100.0 * images.float().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from qdiff.models.tiny import tiny_sd_pipeline

    out = tmp_path_factory.mktemp("guard") / "tiny"
    qdiff.save(qdiff.quantize(tiny_sd_pipeline(), Recipe.from_dict(RECIPE), progress=False), out)
    return out


@pytest.fixture
def bright(monkeypatch):
    import qdiff.sched.run as run

    real = run.make_scorer
    monkeypatch.setattr(run, "make_scorer", lambda spec: Bright() if spec == "bright" else real(spec))


def _run(export, tmp_path, capsys, base=QSCHED, texts=PROMPTS, **qsched):
    from qdiff.cli import main

    recipe, prompts, out = tmp_path / "r.yaml", tmp_path / "p.txt", tmp_path / "out"
    Recipe.from_dict(dict(RECIPE, qsched=dict(base, **qsched))).save(recipe)
    prompts.write_text("\n".join(texts) + "\n")
    argv = ["fit-schedule", str(export), "--prompts", str(prompts), "--recipe", str(recipe), "--out", str(out),
            "--log", str(tmp_path / "fit.jsonl"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return capsys.readouterr().out, json.loads((out / "qdiff.json").read_text())["schedule"]


def test_cli_guard_rejects_a_drifting_schedule(export, tmp_path, capsys, bright):
    text, schedule = _run(export, tmp_path, capsys, guard=True)
    assert "guard: the schedule drifts" in text and "keeping the plain scheduler" in text
    assert schedule is None  # the written export has no schedule: the plain scheduler
    lines = text.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("validation"))
    assert lines[head].split() == ["validation", "alignment", "quality", "log-align", "jaq", "anchor", "drift"]
    ident, cand = lines[head + 1].split(), lines[head + 2].split()
    assert ident[0] == "un-scheduled" and float(ident[-1]) == 1.0 and float(ident[-2]) == 0.0
    assert cand[0] == "schedule" and float(cand[1]) > float(ident[1])  # brighter: the scorer gained ...
    assert float(cand[-1]) > 1.0  # ... by drifting away from the un-scheduled distribution


def test_cli_without_guard_keeps_it_and_reports_the_drift(export, tmp_path, capsys, bright):
    text, schedule = _run(export, tmp_path, capsys)
    assert "Q-Sched: held-out JAQ" in text and schedule is not None
    assert schedule["meta"]["guard"]["features"] == "pixels" and schedule["meta"]["guard"]["validation_drift"] is None
    assert any(x.startswith("schedule (kept)") for x in text.splitlines())
    assert "drift = FD to a second un-scheduled draw" in text


def test_cli_prints_the_family_table_and_keeps_plain_when_a_family_moves(export, tmp_path, capsys, bright):
    text, schedule = _run(export, tmp_path, capsys, FAMILIES, FAMILY_PROMPTS)
    assert "failed" in text and "keeping the plain scheduler" in text and schedule is None
    rows = [line.split() for line in text.splitlines() if line.startswith(("all ", "embedding="))]
    assert [r[0] for r in rows] == ["all", "embedding=c0", "embedding=c1"]
    assert sum(int(r[1]) for r in rows[1:]) == int(rows[0][1]) == 12  # 6 validation prompts x 2 seeds
    assert "FAIL" in {r[-1] for r in rows} and "decision: plain scheduler kept" in text
    saved = json.loads((tmp_path / "fit.report.json").read_text())
    assert not saved["kept"] and saved["message"].startswith("Q-Sched: family ") and len(saved["rows"]) == 3


def test_cli_kept_schedule_records_the_family_table_in_the_export(export, tmp_path, capsys, bright):
    text, schedule = _run(
        export, tmp_path, capsys, FAMILIES, FAMILY_PROMPTS, family_tolerance=1e6
    )  # allow any move: the schedule is kept
    assert "every prompt family passed" in text and schedule is not None
    fam = schedule["meta"]["families"]
    assert fam["kept"] and [r["family"] for r in fam["rows"]] == ["all", "embedding=c0", "embedding=c1"]
    assert all(r["alignment"]["value"] > 0 for r in fam["rows"])  # brighter on every family
