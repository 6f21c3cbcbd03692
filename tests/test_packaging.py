"""The wheel carries the kernels, recipes, prompt sets and bundled assets, and they work by name once installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"kernels": "qdiff/_kernels", "recipes": "qdiff/recipes", "calibration_prompts": "qdiff/calibration_prompts"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "qdiff"
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "out", ".venv")
    shutil.copytree(ROOT, src, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = dist.glob("qdiff-*.whl")
    return path


# In a source checkout (editable install) qdiff/_kernels/__init__.py bridges to the top-level kernels/ folder; a wheel
# carries the kernel files themselves in qdiff/_kernels/ (a namespace package inside qdiff) and not the bridge.
SOURCE_ONLY = {"qdiff/_kernels/__init__.py"}


def _expected_files() -> set[str]:
    """Every .py of the package tree, the mapped folders' files, and bundled assets, as wheel paths."""
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qdiff").rglob("*.py")} - SOURCE_ONLY
    for folder, target in MAPPED.items():
        for p in (ROOT / folder).iterdir():
            if p.is_file() and p.suffix in (".py", ".yaml", ".txt"):
                files.add(f"{target}/{p.name}")
    weights = ROOT / "qdiff" / "models" / "shapes" / "weights"
    if weights.is_dir():
        files |= {p.relative_to(ROOT).as_posix() for p in weights.rglob("*") if p.is_file()}
    return files


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected_files() - names)
    assert not missing, f"missing from the wheel: {missing[:10]}"
    assert {
        "qdiff/_kernels/gemm.py",
        "qdiff/_kernels/tiles.py",
        "qdiff/recipes/w8a8.yaml",
        "qdiff/recipes/w4a8.yaml",
        "qdiff/calibration_prompts/coco.txt",
    } <= names
    assert not any(n.startswith(("tests/", "kernels/", "recipes/")) for n in names)
    assert not SOURCE_ONLY & names, "the source-tree bridge would point the installed package at a missing folder"


def test_installed_wheel_resolves_names(wheel, tmp_path):
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    code = (
        "import qdiff, qdiff._kernels.tiles as tiles\n"
        "from qdiff.config.recipe import Recipe, bundled_recipes\n"
        "from qdiff.sampling.prompts import load_prompts\n"
        f"assert qdiff.__file__.startswith({str(target)!r}), qdiff.__file__\n"
        f"assert tiles.__file__.startswith({str(target)!r}), tiles.__file__\n"
        "assert Recipe.load('w4a8').weights.bits == 4 and 'w8a8' in bundled_recipes()\n"
        "assert len(load_prompts('coco')) >= 64\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and ";" not in line, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    """Every requirement of ``qdiff[test]`` (and its extras, recursively) has an exact pin in constraints.txt, and
    each pin satisfies pyproject's range, so the two files cannot drift apart unnoticed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, pins = project["optional-dependencies"], _pins()
    todo, seen, reqs = ["test"], set(), [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for raw in extras[extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == "qdiff":
                todo += [e for e in req.extras if e not in seen]
            else:
                reqs.append(req)
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name} (pyproject: {req})"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    # the packages issue 22 names, beyond qdiff's direct requirements
    for name in ("torchvision", "huggingface-hub", "kernels", "numpy", "tokenizers", "triton"):
        assert name in pins, f"constraints.txt has no pin for {name}"
