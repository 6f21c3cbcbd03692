"""The benchmark commands run end to end on CPU (interpreter) and say so; numbers are not checked."""

from __future__ import annotations

import os

import pytest
import torch

from qdiff.bench.kernels import Shape, run_kernel_bench
from qdiff.cli import main


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton CPU interpreter (no CUDA)")
def test_kernel_bench_on_interpreter_is_labelled_and_exact(tmp_path, capsys):
    text = run_kernel_bench("cpu", reps=1, shapes=(Shape("tiny", 48, 40, 24),))
    assert "CPU interpreter" in text and "not performance" in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    qdiff_rows = [r for r in rows if "qdiff" in r]
    assert len(qdiff_rows) == 5 and sum("exact" in r for r in qdiff_rows) == 4  # GEMM rows are checked
    assert not any("MISMATCH" in r for r in rows)
    assert any("bf16 torch.mm" in r for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown on a machine without a CUDA GPU")
def test_bench_cli_refuses_missing_gpu(capsys):
    assert main(["bench", "kernels", "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["bench", "kernels", "--device", "cpu", "--sweep"]) == 1
    assert "needs a GPU" in capsys.readouterr().err
