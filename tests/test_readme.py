"""The README's commands are the ones CI runs, so a green CI proves the README."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = ROOT / "README.md"
    ci = ROOT / ".ci" / "run"
    commands = [line.split("  # README")[0] for line in ci.read_text().splitlines() if line.endswith("# README")]
    assert len(commands) == 3, "expected install, main job and test lines marked # README in .ci/run"
    install, main_job, test = commands
    assert test == "python -m pytest -q"
    text = readme.read_text()
    assert f"{install} && {main_job}\n" in text, "README's main job (command 1) differs from .ci/run"
    assert f"{install} && {test}\n" in text, "README's test command (command 2) differs from .ci/run"
    assert main_job.startswith("qdiff quantize") and "--eval" in main_job  # the bundled Shapes model, FP vs quantized
