"""A float16 SDXL-family folder, streamed to a W8A8 export, runs on CPU in ONE compute dtype end to end.

The export keeps the checkpoint's float16 float parts (and its denoiser config carries qdiff's
``quantization_config``); ``qdiff generate``, ``qdiff eval`` and ``qdiff.load`` must still move every float
parameter and buffer of every component (text encoders, denoiser, VAE, every bias) to the one CPU compute dtype:
bfloat16 on a CPU with native bf16 matmuls, else float32. Both CPU kinds are simulated through the flags ``place``
reads; the expected dtype is written out here, not computed by qdiff.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import qdiff
import qdiff.export.resolve as resolve
import qdiff.utils.machine as machine
from qdiff.cli import main
from qdiff.errors import QdiffError
from qdiff.models.tiny import tiny_sdxl_pipeline

SCALES = ("w_scale", "a_scale")  # quantization scales: float32 whatever the compute dtype
BF16_FLAGS = frozenset({"avx512_bf16"})
# (simulated CPU, expected compute dtype); VNNI and the other flags stay as on this machine
CPUS = [pytest.param(("bf16", torch.bfloat16), id="native-bf16"), pytest.param(("old", torch.float32), id="no-bf16")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(float16 pipeline folder, its streamed W8A8 export), written once through the CLI."""
    root = tmp_path_factory.mktemp("fp16")
    folder, export = root / "tiny-sdxl-fp16", root / "w8a8"
    tiny_sdxl_pipeline(0).to(dtype=torch.float16).save_pretrained(folder, safe_serialization=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["quantize", "--model", str(folder), "--recipe", "w8a8", "--out", str(export),
                     "--no-progress"]) == 0  # fmt: skip
    assert "(streamed: read one tensor at a time, never loaded whole)" in printed.getvalue()
    assert json.loads((export / "qdiff.json").read_text())["torch_dtype"] == "float16"
    config = json.loads((export / "unet" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qdiff"  # what once made place() skip the UNet
    return folder, export


@pytest.fixture(params=CPUS)
def cpu(request, monkeypatch) -> torch.dtype:
    """Simulate a CPU with or without native bf16; returns the compute dtype ``place`` must pick for float16."""
    kind, expected = request.param
    flags = machine.cpu_flags() - {"avx512_bf16", "amx_bf16"}
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags | BF16_FLAGS if kind == "bf16" else flags)
    return expected


def float_dtypes(pipe) -> dict[torch.dtype, list[str]]:
    """Floating dtype -> ``component.tensor`` names, over every parameter and buffer of every module component
    (quantization scales reported under their own key)."""
    found: dict[torch.dtype, list[str]] = {}
    for comp, module in pipe.components.items():
        if not isinstance(module, nn.Module):
            continue
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point():
                key = ("scale", t.dtype) if name.rsplit(".", 1)[-1] in SCALES else t.dtype
                found.setdefault(key, []).append(f"{comp}.{name}")
    return found


def assert_one_dtype(pipe, expected: torch.dtype, quantized: bool = True) -> None:
    found = float_dtypes(pipe)
    scales = found.pop(("scale", torch.float32), [])
    assert bool(scales) == quantized and all(k[0] != "scale" for k in found if isinstance(k, tuple)), "fp32 scales"
    assert set(found) == {expected}, {str(k): v[:3] for k, v in found.items()}
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae"):
        assert any(n.startswith(comp + ".") for n in found[expected]), comp


def watch(pipe) -> list[tuple[str, torch.dtype, bool]]:
    """Record (component, output dtype, finite) of every text encoder, UNet and VAE decoder call."""
    seen: list[tuple[str, torch.dtype, bool]] = []

    def hook(name):
        def record(_module, _args, output):
            first = output if isinstance(output, torch.Tensor) else output[0]
            seen.append((name, first.dtype, bool(torch.isfinite(first).all())))

        return record

    for name, module in [("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2),
                         ("unet", pipe.unet), ("vae.decoder", pipe.vae.decoder)]:  # fmt: skip
        module.register_forward_hook(hook(name))
    return seen


@pytest.fixture
def placed(monkeypatch):
    """Every pipeline the CLI places, with a watch on its calls: [(pipe, seen)]."""
    pipes: list = []
    original = resolve.place

    def spy(pipe, *args, **kwargs):
        dtype = original(pipe, *args, **kwargs)
        pipes.append((pipe, watch(pipe)))
        return dtype

    monkeypatch.setattr(resolve, "place", spy)
    return pipes


def assert_ran_in(seen, expected: torch.dtype) -> None:
    assert {name for name, _, _ in seen} == {"text_encoder", "text_encoder_2", "unet", "vae.decoder"}
    assert all(dtype == expected and finite for _, dtype, finite in seen), seen


def test_generate_cli_runs_the_streamed_float16_export_in_one_dtype(folders, cpu, placed, tmp_path, capsys):
    _, export = folders
    png = tmp_path / "car.png"
    argv = ["generate", str(export), "--prompt", "a red car", "--steps", "1", "--guidance", "0", "--height", "64",
            "--width", "64", "--out", str(png)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith(f"{str(cpu).removeprefix('torch.')})")
    [(pipe, seen)] = placed
    assert_one_dtype(pipe, cpu)
    assert_ran_in(seen, cpu)
    assert Image.open(png).size == (64, 64)


def test_eval_cli_scores_the_float16_folder_and_its_export_in_one_dtype(folders, cpu, placed, tmp_path, capsys):
    folder, export = folders
    out = tmp_path / "ev"
    argv = ["eval", str(folder), str(export), "--out", str(out), "--num-prompts", "2", "--steps", "1",
            "--guidance", "0", "--clip", "none", "--quality", "none", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert len(placed) == 2  # the float folder (the SSIM reference), then the export
    for (pipe, seen), quantized in zip(placed, (False, True)):
        assert_one_dtype(pipe, cpu, quantized)
        assert_ran_in(seen, cpu)
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    assert metrics["w8a8"]["ssim"] > 0.9  # against the float model, drawn in the same dtype


def test_load_places_a_float16_export_and_draws_what_generate_draws(folders, cpu, tmp_path):
    _, export = folders
    pipe = qdiff.load(export)
    assert_one_dtype(pipe, cpu)
    seen = watch(pipe)
    gen = torch.Generator("cpu").manual_seed(0)
    images = pipe("a red car", num_inference_steps=1, guidance_scale=0.0, height=64, width=64, generator=gen,
                  output_type="pt").images  # fmt: skip
    assert_ran_in(seen, cpu)
    assert images.dtype == cpu and torch.isfinite(images).all()
    png = tmp_path / "car.png"
    assert main(["generate", str(export), "--prompt", "a red car", "--steps", "1", "--guidance", "0",
                 "--height", "64", "--width", "64", "--out", str(png)]) == 0  # fmt: skip
    drawn = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).permute(2, 0, 1).float()
    assert (drawn - images[0].float() * 255).abs().max() <= 1.0  # the API and the CLI draw the same picture


def test_load_dtype_overrides_and_a_bad_name_is_one_line(folders):
    _, export = folders
    assert_one_dtype(qdiff.load(export, dtype="float32"), torch.float32)
    assert_one_dtype(qdiff.load(export, dtype=torch.bfloat16), torch.bfloat16)
    with pytest.raises(QdiffError, match=r"^unknown dtype 'int8'; use one of: float32, float16, bfloat16$"):
        qdiff.load(export, dtype="int8")
