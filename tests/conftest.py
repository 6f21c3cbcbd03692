"""Shared fixtures: offline environment, a ``device`` fixture that always includes CPU, tiny pipelines."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tiny test models are overhead-bound: one thread is as fast as two and cannot oversubscribe the
# 2-core CI machine (measured here: a 15 s module took 106 s with 2 threads beside another process).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Triton kernels (tests/kernels) run through the CPU interpreter when there is no GPU; triton.jit reads this
# when a kernel module is imported, so it is set here, before any test module imports qdiff._kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _devices() -> list[str]:
    devices = ["cpu"]
    if os.environ.get("QDIFF_TEST_CUDA") == "1" and torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    """CPU always; CUDA too when QDIFF_TEST_CUDA=1 and a GPU is present."""
    return torch.device(request.param)


@pytest.fixture
def kdev() -> torch.device:
    """Where the Triton kernel tests run: CUDA when present, else CPU through the Triton interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen():
    """A fresh seeded CPU generator per test."""
    return torch.Generator("cpu").manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_w8a8_export(tmp_path_factory) -> Path:
    """A tiny SD W8A8 export shared by the tests that only read it (copy it before changing anything)."""
    import qdiff
    from qdiff.models.tiny import tiny_sd_pipeline

    pipe = qdiff.quantize(tiny_sd_pipeline(seed=3), "w8a8", progress=False)
    return qdiff.save(pipe, tmp_path_factory.mktemp("tiny-w8a8") / "model")


def copy_export(export: Path, tmp_path: Path) -> Path:
    """A private copy of ``export`` under ``tmp_path`` for a test to change."""
    return Path(shutil.copytree(export, tmp_path / "copy"))


def generate(pipe, prompt="a red circle on the left", seed=0, steps=2, **kwargs) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from a seeded run."""
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs.setdefault("guidance_scale", 1.0)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pt", **kwargs).images


_RECORDING: list[list[str]] = []  # the open-file lists of the recordings in progress (innermost last)


def _audit(event: str, args: tuple) -> None:
    """Every file this process opens through Python (``open``, ``os.open``), while a test records."""
    if event == "open" and _RECORDING and isinstance(args[0], str | bytes | os.PathLike):
        _RECORDING[-1].append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only appends while a test records


@contextlib.contextmanager
def recording_opens() -> Iterator[list[str]]:
    """``with recording_opens() as opened:`` -> the absolute paths of the files opened inside the block."""
    opened: list[str] = []
    _RECORDING.append(opened)
    try:
        yield opened
    finally:
        _RECORDING.pop()


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as the module ``name`` (scripts are not a package)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
