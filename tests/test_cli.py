"""CLI: the happy path end to end, and one test per bad input (one line, exit 1, no partial output)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
    assert "81 quantized (81x W8A8)" in text
    assert (out / "qdiff.json").is_file()
    import qdiff
    from qdiff.eval.size import module_nbytes
    from qdiff.models.tiny import tiny_sd_pipeline

    fp, q = module_nbytes(tiny_sd_pipeline(seed=0).unet), module_nbytes(qdiff.load(out).unet)  # no checkpoint file
    mib = 2**20
    expected = f"{fp / mib:.2f} MiB float32 in memory -> {q / mib:.2f} MiB quantized ({q / fp:.3f}x)"
    assert _size_line(text) == f"denoiser   {expected}"


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


# ---- numeric options: range-checked at parse time, one line, exit 1, nothing written --------------------------------
BAD_NUMBERS = [
    (["generate", "EXPORT", "--prompt", "a", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (
        ["generate", "EXPORT", "--prompt", "a", "--height", "0"],
        "--height must be a positive multiple of 8 pixels, got 0",
    ),
    (["generate", "EXPORT", "--prompt", "a", "--width", "100"], "--width must be a positive multiple of 8 pixels"),
    (["generate", "EXPORT", "--prompt", "a", "--guidance", "-1"], "--guidance must be a finite number >= 0, got -1"),
    (["generate", "EXPORT", "--prompt", "a", "--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["generate", "EXPORT", "--prompt", "a", "--seed", "-1"], "--seed must be an integer in [0, 2**62), got -1"),
    (["eval", "EXPORT", "--seed", str(2**64)], "--seed must be an integer in [0, 2**62)"),
    (["eval", "EXPORT", "--num-prompts", "0"], "--num-prompts must be a positive integer, got 0"),
    (["eval", "EXPORT", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["eval", "EXPORT", "--steps", "-3"], "--steps must be a positive integer, got -3"),
    (["quantize", "--eval", "--eval-num-prompts", "0"], "--eval-num-prompts must be a positive integer, got 0"),
    (["bench", "kernels", "--reps", "0"], "--reps must be a positive integer, got 0"),
    (["bench", "pipeline", "--reps", "-1"], "--reps must be a positive integer, got -1"),
    (["bench", "pipeline", "--height", "12"], "--height must be a positive multiple of 8 pixels, got 12"),
]


@pytest.mark.parametrize("argv,fragment", BAD_NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_NUMBERS])
def test_numeric_options_out_of_range(export_dir, tmp_path, capsys, argv, fragment):
    out = tmp_path / "out.png"
    argv = [str(export_dir) if a == "EXPORT" else a for a in argv] + ["--out", str(out)]
    _fails(capsys, argv, fragment)
    assert len(capsys.readouterr().err.strip().splitlines()) <= 1 and not out.exists()


def test_non_numeric_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "x", "--prompt", "a", "--out", "o.png", "--steps", "four"])
    assert info.value.code == 2 and "argument --steps: invalid integer value: 'four'" in capsys.readouterr().err


# ---- the checkpoint's own bytes next to the in-memory float copy; NaN weights refused ------------------------------
@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    """tiny-sd saved in float16: diffusers loads it as float32 unless --dtype says otherwise."""
    import torch

    from qdiff.models.tiny import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("fp16") / "tiny-sd-fp16"
    tiny_sd_pipeline(seed=0).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def _unet_file(folder):
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _size_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("denoiser "))


def test_size_line_shows_float16_checkpoint_and_float32_copy(fp16_folder, tmp_path, capsys):
    from safetensors.torch import load_file

    import qdiff
    from qdiff.eval.size import module_nbytes

    tensors = load_file(str(_unet_file(fp16_folder)))
    assert {t.dtype for t in tensors.values()} == {__import__("torch").float16}
    ck = sum(t.numel() * 2 for t in tensors.values())  # bytes on disk
    mem = sum(t.numel() * 4 for t in tensors.values())  # the float32 copy diffusers makes by default
    out = tmp_path / "q32"
    assert main(["quantize", "--model", str(fp16_folder), "--out", str(out), "--no-progress", "--in-memory"]) == 0
    q = module_nbytes(qdiff.load(out).unet)  # measured again from the reloaded export
    mib = 2**20
    assert _size_line(capsys.readouterr().out) == (
        f"denoiser   {ck / mib:.2f} MiB float16 checkpoint ({mem / mib:.2f} MiB as float32 in memory) -> "
        f"{q / mib:.2f} MiB quantized ({q / ck:.3f}x the checkpoint)"
    )
    out16 = tmp_path / "q16"
    assert (
        main(["quantize", "--model", str(fp16_folder), "--dtype", "float16", "--out", str(out16), "--no-progress",
              "--in-memory"])
        == 0
    )  # fmt: skip
    q16 = module_nbytes(qdiff.load(out16, dtype="float16").unet)  # as stored (on CPU load picks bf16 or fp32)
    assert _size_line(capsys.readouterr().out) == (
        f"denoiser   {ck / mib:.2f} MiB float16 checkpoint -> {q16 / mib:.2f} MiB quantized "
        f"({q16 / ck:.3f}x the checkpoint)"
    )
    # the default for a local folder: streamed, the same export bytes as in memory at the checkpoint's dtype
    streamed = tmp_path / "streamed"
    assert main(["quantize", "--model", str(fp16_folder), "--out", str(streamed), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "(streamed: read one tensor at a time, never loaded whole)" in text
    assert _size_line(text) == (
        f"denoiser   {ck / mib:.2f} MiB float16 checkpoint -> {q16 / mib:.2f} MiB quantized "
        f"({q16 / ck:.3f}x the checkpoint, measured from the files)"
    )
    weights = "unet/qdiff.safetensors"
    assert (streamed / weights).read_bytes() == (out16 / weights).read_bytes()


def test_quantize_refuses_a_checkpoint_with_nan_weights(fp16_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(fp16_folder, bad)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    tensors = load_file(str(_unet_file(bad)))
    tensors[key].view(-1)[:3] = float("nan")
    save_file(tensors, str(_unet_file(bad)))
    out = tmp_path / "o"
    fragment = "denoiser: weight of 'down_blocks.0.attentions.0.proj_in' has 3 NaN values"
    _fails(capsys, ["quantize", "--model", str(bad), "--out", str(out), "--no-progress", "--in-memory"], fragment)
    assert not out.exists()
    streamed = "'down_blocks.0.attentions.0.proj_in' has 3 NaN values; non-finite weights would reach every image"
    _fails(capsys, ["quantize", "--model", str(bad), "--out", str(out), "--no-progress"], streamed)
    assert not out.exists()


# ---- noise: nothing imports bitsandbytes unless a recipe uses it ----------------------------------------------------
_NO_BNB = """
import sys
from qdiff.cli import main
rc = main(["quantize", "--model", "builtin:tiny-sd", "--out", sys.argv[1], "--no-progress"])
print("BNB-IMPORTED", "bitsandbytes" in sys.modules)
import importlib.util
if importlib.util.find_spec("bitsandbytes") is None:
    print("LAZY-OK no bitsandbytes")
else:  # diffusers' own bitsandbytes path still resolves: its first use imports bitsandbytes (notice filtered)
    import diffusers.quantizers.bitsandbytes.utils as u
    linear4bit = u.bnb.nn.Linear4bit
    import bitsandbytes.nn
    print("LAZY-OK", linear4bit is bitsandbytes.nn.Linear4bit)
sys.exit(rc)
"""


def test_quantize_neither_imports_bitsandbytes_nor_prints_its_notice(tmp_path):
    """A subprocess (a fresh interpreter) started at the repository root, where users start: the top-level
    ``kernels/`` folder must not shadow Hugging Face's ``kernels`` package that bitsandbytes and transformers use."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _NO_BNB, str(tmp_path / "o")], capture_output=True, text=True,
                         cwd=root, timeout=300)  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "BNB-IMPORTED False" in out.stdout and "LAZY-OK" in out.stdout and "LAZY-OK False" not in out.stdout
    noisy = [line for line in text.splitlines() if "kernels-community" in line or "bitsandbytes" in line.lower()]
    assert not noisy, noisy


def test_bitsandbytes_notice_filter_drops_only_that_notice():
    import logging

    from qdiff.utils.lazy_imports import BNB_NOTICE, DropNotice

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 1, msg, ("x",), None)

    notice = DropNotice(BNB_NOTICE)
    assert not notice.filter(record(BNB_NOTICE + ": %s. Please make sure you already `pip install kernels`"))
    assert notice.filter(record("The installed version of bitsandbytes was compiled without GPU support: %s"))
    assert notice.filter(record("Failed to load CPU gemm_4bit_backward: %s"))
