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


def _table(text: str, heading: str) -> list[list[str]]:
    """Cells of the first Markdown table after ``heading`` (header and separator rows dropped)."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_bench_cpu_quick_rows_ran_on_the_backend_they_name(tmp_path, capsys):
    from qdiff.backends.registry import recording
    from qdiff.bench.cpu import gate

    if not gate()[0]:
        pytest.skip("cpu_int8 is off on this CPU (its exactness gate failed): the bench skips the int8 rows")
    out = tmp_path / "cpu.md"
    with recording() as outer:  # the timed rounds run outside the bench's own spy (it spies the warm-up calls)
        assert main(["bench", "cpu", "--quick", "--rounds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.split(f"wrote {out}")[0]  # printed and written alike
    assert text.startswith("## CPU (issue 16)") and "avx512_vnni" in text and "`cpu_int8` on" in text
    assert "- command: `qdiff bench cpu --layers --pipeline --quick --rounds 1`" in text

    layers = _table(text, "### Per layer")
    # one Linear shape: fp32, bf16, reference, 3 int8 schemes + W4A8 with int4 resident; the conv: fp32, bf16,
    # W8A8 reference, 3 int8 schemes (W4A8 g64: group-wise conv on cpu_int8) + W4A8 g64 on the reference
    assert len(layers) == 7 + 7
    conv_w4 = [r for r in layers if r[0].startswith("conv") and r[1].startswith("W4A8 g64")]
    assert sorted(r[1] for r in conv_w4) == ["W4A8 g64 (cpu_int8)", "W4A8 g64 (torch)"]
    for layer, variant, backend, ms, vs_fp32, vs_bf16, exact in layers:
        assert float(ms) > 0 and vs_fp32.endswith("x") and vs_bf16.endswith("x")
        if variant in ("fp32", "bf16"):
            assert (backend, exact) == ("float", "")
        elif "unpack per call" in variant:  # the resident-layout comparison calls the kernels directly
            assert (backend, exact) == ("cpu_int8 kernels, direct", "= reference"), layer
        elif variant.endswith("(torch)"):
            assert (backend, exact) == ("torch ×1", "")
        else:
            assert variant.endswith("(cpu_int8)") and (backend, exact) == ("cpu_int8 ×1", "= reference"), layer

    pipes = _table(text, "### Shapes pipeline")
    assert [(r[0], r[1]) for r in pipes] == [
        ("fp32", "fp32"), ("bf16", "bf16"), ("W8A8 (cpu_int8)", "fp32"), ("W8A8 (cpu_int8)", "bf16"),
        ("W4A8 (cpu_int8)", "fp32"), ("W4A8 (cpu_int8)", "bf16"), ("W8A8 (torch)", "fp32"),
    ]  # fmt: skip
    by_row = {(r[0], r[1]): r for r in pipes}
    assert by_row[("fp32", "fp32")][6] == "1.0000 / 1.0000"  # the SSIM reference itself
    w8 = by_row[("W8A8 (cpu_int8)", "fp32")]
    assert w8[2].startswith("cpu_int8 ×") and "torch" not in w8[2] and w8[7] == "= reference twin"
    w4 = by_row[("W4A8 (cpu_int8)", "bf16")]  # group-wise 3x3 convs included: every quantized layer on cpu_int8
    assert w4[2].startswith("cpu_int8 ×") and "torch" not in w4[2] and w4[7] == "= reference twin"
    assert (
        by_row[("W8A8 (torch)", "fp32")][2].startswith("torch ×")
        and "cpu_int8" not in by_row[("W8A8 (torch)", "fp32")][2]
    )
    # same codes, other backend: the twin rows must show identical pictures (equal SSIM to fp32)
    assert by_row[("W8A8 (torch)", "fp32")][6] == w8[6]
    assert {("cpu_int8", "linear"), ("cpu_int8", "conv2d"), ("torch", "linear")} <= set(outer)
    targets = _table(text, "### Targets")
    assert [t[0].split(" per image")[0] for t in targets] == ["Shapes W8A8", "Shapes W4A8"]
    assert all(t[3] in ("met", "**missed**") for t in targets)
