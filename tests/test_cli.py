"""CLI: the happy path end to end, and one test per bad input (one line, exit 1, no partial output)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from PIL import Image

from qdiff.cli import main


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny-w8a8"
    assert (
        main(["quantize", "--model", "builtin:tiny-sd", "--recipe", "w8a8", "--out", str(out), "--no-progress"]) == 0
    )
    return out


def _fails(capsys, argv, fragment):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    last = err[-1]
    assert last.startswith("qdiff: error: ") and fragment in last, err
    assert not any("Traceback" in line for line in err)


def test_quantize_prints_summary(export_dir, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["quantize", "--model", "builtin:tiny-sd", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "81 quantized (81x W8A8)" in text and "measured" in text
    assert (out / "qdiff.json").is_file()


def test_generate_and_inspect(export_dir, tmp_path, capsys):
    png = tmp_path / "img.png"
    assert (
        main(
            [
                "generate",
                str(export_dir),
                "--prompt",
                "a red circle",
                "--prompt",
                "a blue square",
                "--steps",
                "2",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert Image.open(png).size == (128, 64)
    assert main(["inspect", str(export_dir)]) == 0
    report = capsys.readouterr().out
    assert "W8A8" in report and "denoiser total" in report


def test_missing_model(tmp_path, capsys):
    _fails(
        capsys, ["quantize", "--model", "org/not-here", "--out", str(tmp_path / "o")], "model 'org/not-here' not found"
    )
    assert not (tmp_path / "o").exists()


def test_no_model_anywhere(tmp_path, capsys):
    # a recipe without `model:` and no --model (without --recipe, the default is the bundled Shapes model's)
    _fails(capsys, ["quantize", "--recipe", "w8a8", "--out", str(tmp_path / "o")], "recipe: model: missing")


def test_bad_recipe_value(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nweights: {bits: 5}\n")
    _fails(
        capsys,
        ["quantize", "--model", "builtin:tiny-sd", "--recipe", str(bad), "--out", str(tmp_path / "o")],
        "recipe: weights.bits: got 5",
    )
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_name(tmp_path, capsys):
    _fails(
        capsys,
        ["quantize", "--model", "builtin:tiny-sd", "--recipe", "w9a9", "--out", str(tmp_path / "o")],
        "recipe 'w9a9' not found",
    )


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(
        capsys, ["quantize", "--model", "builtin:tiny-sd", "--out", str(blocker / "sub")], "is not a writable folder"
    )
    assert blocker.read_text() == "x"


def test_existing_output_needs_overwrite(export_dir, capsys):
    _fails(capsys, ["quantize", "--model", "builtin:tiny-sd", "--out", str(export_dir)], "already exists")


def test_tampered_safetensors(export_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    path = bad / "unet" / "qdiff.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    png = tmp_path / "x.png"
    _fails(capsys, ["generate", str(bad), "--prompt", "a", "--out", str(png)], "qdiff.safetensors: sha256 mismatch")
    assert not png.exists()


def test_missing_weights_file(export_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    (bad / "unet" / "qdiff.safetensors").unlink()
    _fails(capsys, ["inspect", str(bad)], "unet/qdiff.safetensors: listed in qdiff.json but missing")


def test_inspect_not_an_export(tmp_path, capsys):
    _fails(capsys, ["inspect", str(tmp_path)], "is not a qdiff export")


def test_console_script_installed():
    exe = shutil.which("qdiff") or str(__import__("pathlib").Path(sys.executable).parent / "qdiff")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("qdiff ")
