"""`qdiff eval` and `qdiff quantize --eval` from the command line: outputs, defaults, one-line errors."""

from __future__ import annotations

import json

from qdiff.cli import main


def test_eval_cli_float_vs_export(tmp_path, capsys):
    export = tmp_path / "q"
    assert main(["quantize", "--model", "builtin:tiny-sd", "--recipe", "w8a8", "--out", str(export),
                 "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "ev"
    argv = ["eval", "builtin:tiny-sd", str(export), "--out", str(out), "--num-prompts", "2", "--steps", "2",
            "--clip", "none", "--quality", "none", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| FP |" in printed and "| w8a8 |" in printed
    data = json.loads((out / "report.json").read_text())
    assert list(data["metrics"]) == ["FP", "w8a8"] and data["meta"]["sampler"]["steps"] == 2
    assert data["metrics"]["w8a8"]["ssim"] > 0.95
    assert len(data["prompts"]) == 2 and (out / "grid.png").is_file()
    assert main(argv) == 1  # exists
    assert "already exists" in capsys.readouterr().err


def test_eval_cli_bad_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", str(tmp_path / "nope"), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qdiff: error:")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["eval", "builtin:tiny-sd", "--out", str(out), "--clip", "blip", "--no-progress"]) == 1
    assert "unknown scorer 'blip'" in capsys.readouterr().err and not out.exists()
    assert main(["eval", "builtin:tiny-sd", "--out", str(out), "--batch-size", "0"]) == 1
    assert "--batch-size must be a positive integer, got 0" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", "--out", str(tmp_path / "q"), "--eval", "--eval-num-prompts", "-1"]) == 1
    assert "--eval-num-prompts must be a positive integer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_quantize_eval_main_job_on_shapes(tmp_path, capsys):
    out = tmp_path / "shapes-w8a8"
    assert main(["quantize", "--out", str(out), "--eval", "--eval-num-prompts", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "recipe     shapes-w8a8" in printed and "| real renders |" in printed
    data = json.loads((tmp_path / "shapes-w8a8-eval" / "report.json").read_text())
    fp, q = data["metrics"]["FP"], data["metrics"]["shapes-w8a8"]
    assert q["denoiser_mib"] < 0.3 * fp["denoiser_mib"] and q["ssim"] > 0.95
    assert {"clip_score", "quality", "acc_shape", "shapes_fid"} <= set(q)
    assert (tmp_path / "shapes-w8a8-eval" / "grid.png").is_file() and (out / "qdiff.json").is_file()
