"""The README's commands are the ones CI runs, so a green CI proves the README."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = ROOT / "README.md"
    ci = ROOT / ".ci" / "run"
    commands = [line.split("  # README")[0] for line in ci.read_text().splitlines() if line.endswith("# README")]
    assert len(commands) == 2
    install, test = commands
    text = readme.read_text()
    assert f"{install} && python -m pytest -q" == f"{install} && {test}"
    assert f"{install} && {test}\n" in text, "README's test command differs from .ci/run"
    main_job = next(line for line in text.splitlines() if line.startswith(install + " && qdiff quantize"))
    assert "--model builtin:" in main_job
