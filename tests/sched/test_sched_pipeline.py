"""Q-Sched on a quantized tiny pipeline: reference-free proof, save -> load, API and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qdiff
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.sched.qsched import Schedule, apply_schedule, get_schedule

PROMPTS = ["a red cat", "a blue house", "a green tree on a hill"]
RECIPE = {
    "name": "tiny-qsched",
    "quantize_protected": True,  # every Linear/Conv2d of the denoiser is quantized: no float layer is left
    "sampler": {"steps": 2, "height": 32, "width": 32},
    "qsched": {"grid_size": 3, "num_prompts": 2, "heldout_prompts": 1, "alignment": "pyiqa:entropy",
               "quality": "pyiqa:piqe", "k": 0.01, "log_alignment": True},
}  # fmt: skip


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from qdiff.models.tiny import tiny_sd_pipeline

    out = tmp_path_factory.mktemp("qsched") / "tiny-w8a8"
    qdiff.save(qdiff.quantize(tiny_sd_pipeline(), Recipe.from_dict(RECIPE), progress=False), out)
    return out


def _images(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS[:2], num_inference_steps=2, generator=gen, height=32, width=32, output_type="pt").images


def test_fit_never_runs_a_float_layer_of_the_denoiser(export):
    """Fitting on a loaded export (no float checkpoint exists): every denoiser Linear/Conv2d call is integer."""
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.modules import QuantLayer

    pipe = qdiff.load(export)
    den = find_denoiser(pipe)[1]
    quant = [m for m in den.modules() if isinstance(m, QuantLayer)]
    assert quant and all(m.state == "frozen" and getattr(m, "weight", None) is None for m in quant)
    calls = {"float": 0, "int": 0}

    def counter(kind):
        return lambda *_: calls.__setitem__(kind, calls[kind] + 1)

    layers = [m for m in den.modules() if isinstance(m, (nn.Linear, nn.Conv2d, QuantLayer))]
    hooks = [m.register_forward_hook(counter("int" if isinstance(m, QuantLayer) else "float")) for m in layers]
    try:
        result = qdiff.fit_schedule(pipe, Recipe.from_dict(RECIPE), prompts=PROMPTS, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls["float"] == 0 and calls["int"] > 0
    # the 3x3 grid over [0.8, 1.2] contains identity, which is drawn once: 9 fitting points x 2 prompts, then the
    # held-out prompt for identity and, unless the search's best is identity, for the best (also when refused)
    from qdiff.sched.fit import rounded_schedule

    best_is_identity = rounded_schedule(result.parameterisation, result.theta, 2).is_identity
    assert result.generations == 9 * 2 + (1 if best_is_identity else 2) * 1
    assert result.evaluations == 10 and len(result.curve) == 10
    assert (get_schedule(pipe) is not None) == result.accepted  # installed only when the held-out set agrees


def test_fit_needs_a_quantized_pipeline():
    from qdiff.models.tiny import tiny_sd_pipeline

    with pytest.raises(QdiffError, match="needs a quantized pipeline"):
        qdiff.fit_schedule(tiny_sd_pipeline(), Recipe.from_dict(RECIPE), prompts=PROMPTS)
    pipe = tiny_sd_pipeline()
    with pytest.raises(QdiffError, match=r"qsched.num_prompts: 2 fitting \+ 1 held-out prompts needed, only 2 given"):
        from qdiff.sched.run import split_prompts

        split_prompts(Recipe.from_dict(RECIPE), PROMPTS[:2])
    assert get_schedule(pipe) is None


def test_save_load_keeps_coefficients_and_images(export, tmp_path):
    pipe = qdiff.load(export)
    schedule = Schedule((0.93, 1.0), (1.04, 1.0), {"parameterisation": "ramp", "theta": [0.93, 1.04]})
    apply_schedule(pipe, schedule)
    before = _images(pipe)
    out = qdiff.save(pipe, tmp_path / "with-schedule")
    manifest = json.loads((out / "qdiff.json").read_text())
    assert manifest["schedule"] == schedule.to_dict()
    assert "scheduler/qsched.json" in manifest["files"]  # covered by the manifest hashes
    assert json.loads((out / "model_index.json").read_text())["scheduler"][1] == "LCMScheduler"
    loaded = qdiff.load(out)
    assert get_schedule(loaded) == schedule and get_schedule(loaded).meta == schedule.meta
    assert torch.equal(_images(loaded), before)
    assert not torch.equal(_images(qdiff.load(export)), before)  # the export without a schedule draws differently
    (out / "scheduler" / "qsched.json").write_text(json.dumps(Schedule.identity(2).to_dict()))
    with pytest.raises(QdiffError, match="sha256 mismatch"):
        qdiff.load(out)


def test_cli_fit_schedule_writes_export_and_resumes(export, tmp_path, capsys):
    from qdiff.cli import main

    recipe = tmp_path / "r.yaml"
    data = dict(RECIPE, qsched=dict(RECIPE["qsched"], grid_size=3, min_gain=0.0))
    Recipe.from_dict(data).save(recipe)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "fitted"
    argv = ["fit-schedule", str(export), "--prompts", str(prompts), "--recipe", str(recipe), "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "Q-Sched:" in first and (tmp_path / "fitted.qsched-log.jsonl").is_file()
    schedule = json.loads((out / "qdiff.json").read_text())["schedule"]
    assert ("no held-out gain" in first) == (schedule is None)
    if schedule is not None:
        assert schedule["meta"]["scorers"] == ["pyiqa:entropy", "pyiqa:piqe"]
        assert schedule["meta"]["qsched"]["grid_size"] == 3
    assert main(argv + ["--overwrite"]) == 0
    second = capsys.readouterr().out
    assert "(0 new of" in second  # replayed from the log
    assert [x for x in first.splitlines() if x.startswith("c_")] == [
        x for x in second.splitlines() if x.startswith("c_")
    ]
    assert main(["fit-schedule", str(export), "--recipe", str(tmp_path / "missing.yaml")]) == 1
