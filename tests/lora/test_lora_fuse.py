"""``--lora PATH[:SCALE]``: LoRAs fused into the float weights before calibrating and quantizing, streamed or in
memory, against diffusers' own ``fuse_lora`` and float64 arithmetic; the manifest records them; bad input is one
line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import qdiff
from qdiff.cli import main
from qdiff.config.recipe import Recipe
from qdiff.export.checkpoint import open_checkpoint
from qdiff.export.resolve import load_pipeline
from qdiff.models.tiny_loras import write_tiny_lora


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny SDXL pipeline folder, a LoRA with alpha 8 / rank 4 in its metadata, a second LoRA)."""
    root = tmp_path_factory.mktemp("sdxl")
    pipe = load_pipeline("builtin:tiny-sdxl")
    pipe.save_pretrained(root / "float")
    return (
        root / "float",
        write_tiny_lora(pipe, root / "a.safetensors"),
        write_tiny_lora(pipe, root / "b.safetensors", seed=5, rank=2, alpha=1),
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights = json.loads((folder / "qdiff.json").read_text())["denoiser"]["weights"]
    with open_checkpoint(folder / weights) as reader:
        return {k: reader.get(k) for k in reader.keys()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, t in a.items():
        assert t.dtype == b[key].dtype and torch.equal(t, b[key]), key


def _run(argv: list[str], capsys) -> str:
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_streamed_and_in_memory_fuse_equal_diffusers_fuse(sdxl, tmp_path, capsys):
    folder, a, b = sdxl
    loras = ["--lora", f"{a}:0.7", "--lora", f"{b}:-0.5"]
    base = ["quantize", "--model", str(folder), "--recipe", "w8a8", *loras]
    out = _run([*base, "--out", str(tmp_path / "streamed")], capsys)
    assert "streamed" in out and f"lora       {a}:0.7 fused into the float weights (sha256" in out
    _run([*base, "--out", str(tmp_path / "memory"), "--in-memory"], capsys)
    streamed = _tensors(tmp_path / "streamed")
    _assert_same(streamed, _tensors(tmp_path / "memory"))

    reference = load_pipeline(str(folder))  # diffusers' own fuse of both LoRAs, then qdiff without any
    for path, scale in ((a, 0.7), (b, -0.5)):
        reference.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
        reference.fuse_lora(lora_scale=scale, adapter_names=["x"])
        reference.unload_lora_weights()
    conv_in = reference.unet.conv_in.weight.detach().clone()
    _assert_same(streamed, qdiff.quantize(reference, "w8a8", progress=False).unet.state_dict())

    float_w = load_pipeline(str(folder)).unet.conv_in.weight.double()  # float64: W + 0.7 * 8/4 * B@A + ...
    from safetensors.torch import load_file

    fa, fb = load_file(str(a)), load_file(str(b))
    delta = [0.7 * 8 / 4 * torch.einsum("nr,rckl->nckl", f["unet.conv_in.lora_B.weight"].double()[:, :, 0, 0],
                                         f["unet.conv_in.lora_A.weight"].double()) for f in (fa,)]  # fmt: skip
    delta.append(-0.5 * 1 / 2 * torch.einsum("nr,rckl->nckl", fb["unet.conv_in.lora_B.weight"].double()[:, :, 0, 0],
                                              fb["unet.conv_in.lora_A.weight"].double()))  # fmt: skip
    expected = float_w + sum(delta)
    assert (streamed["conv_in.weight"].double() - expected).abs().max() < 1e-6 * expected.abs().max()
    assert torch.equal(streamed["conv_in.weight"], conv_in)

    recorded = json.loads((tmp_path / "streamed" / "qdiff.json").read_text())["recipe"]["loras"]
    assert [(r["path"], r["scale"]) for r in recorded] == [(str(a), 0.7), (str(b), -0.5)]
    assert all(len(r["sha256"]) == 64 for r in recorded)


def test_calibrate_with_lora_then_quantize_streams(sdxl, tmp_path, capsys):
    """PCM-style: the LoRA is fused before calibrating (the ranges are the fused model's); quantize --calib fuses it
    again while streaming, equal to the in-memory run; another LoRA than the calibration's is refused."""
    folder, a, _ = sdxl
    recipe = Recipe.load("w8a8-static")
    small = {"proxy": "local", "w_bits_content": (8,), "w_bits_quality": (8,), "a_bits": (8,), "fast_prompts": 1}
    recipe = recipe.replace(
        sampler=dataclasses.replace(recipe.sampler, steps=1, height=64, width=64),
        calibration=dataclasses.replace(recipe.calibration, num_prompts=2, batch_size=2),
        sensitivity=dataclasses.replace(recipe.sensitivity, **small),  # a light sensitivity pass: ranges are tested
    )
    recipe.save(tmp_path / "static.yaml")
    for lora, calib in (([], tmp_path / "plain"), (["--lora", str(a)], tmp_path / "calib")):
        _run(["calibrate", "--model", str(folder), "--recipe", str(tmp_path / "static.yaml"), *lora,
              "--out", str(calib)], capsys)  # fmt: skip
    seen = Recipe.load(tmp_path / "calib" / "recipe.yaml").loras
    assert len(seen) == 1 and seen[0].path == str(a) and seen[0].scale == 1.0 and seen[0].sha256
    ranges = [json.loads((tmp_path / c / "ranges.json").read_text()) for c in ("plain", "calib")]
    assert ranges[0] != ranges[1]  # calibration saw the fused model
    base = ["quantize", "--model", str(folder), "--calib", str(tmp_path / "calib")]
    assert "streamed" in _run([*base, "--out", str(tmp_path / "s")], capsys)
    _run([*base, "--out", str(tmp_path / "m"), "--in-memory"], capsys)
    _assert_same(_tensors(tmp_path / "s"), _tensors(tmp_path / "m"))
    assert main([*base, "--lora", f"{a}:0.5", "--out", str(tmp_path / "x")]) == 1
    assert "was calibrated with other LoRAs fused; quantize with the same (--lora " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_lora_input_is_one_line(sdxl, tmp_path, capsys):
    folder, a, _ = sdxl
    (tmp_path / "x.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        str(tmp_path / "x.bin"): "only .safetensors LoRA files are loaded (never pickle",
        str(tmp_path / "missing.safetensors"): "file not found",
        str(tmp_path / "junk.safetensors"): "not a readable safetensors file",
    }
    for lora, message in cases.items():
        out = tmp_path / "out"
        assert main(["quantize", "--model", str(folder), "--lora", lora, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("qdiff: error: LoRA ") and message in err and err.count("\n") == 1, err
        assert not out.exists()
    recipe = Recipe.load("w8a8").replace(loras=(qdiff.Recipe.from_dict({"loras": [{"path": str(a)}]}).loras[0],))
    bad = dataclasses.replace(recipe.loras[0], sha256="0" * 64)
    recipe.replace(loras=(bad,)).save(tmp_path / "r.yaml")
    assert main(["quantize", "--model", str(folder), "--recipe", str(tmp_path / "r.yaml"), "--out", str(out)]) == 1
    assert "differs from the recorded 000000000000" in capsys.readouterr().err
    with pytest.raises(qdiff.QdiffError, match=r"recipe: loras\[\]\.scale: must be a finite number"):
        Recipe.from_dict({"loras": [{"path": "x.safetensors", "scale": float("nan")}]})


def test_lora_argument_parsing():
    from qdiff.config.loras import parse_lora

    assert parse_lora("a/b.safetensors") == parse_lora("a/b.safetensors:1")
    lora = parse_lora("a/b.safetensors:0.8")
    assert (lora.path, lora.scale) == ("a/b.safetensors", 0.8)
    assert parse_lora("C:/x/b.safetensors").path == "C:/x/b.safetensors"  # a colon inside the path
    with pytest.raises(qdiff.QdiffError, match=r"the scale 'abc' is not a number"):
        parse_lora("a/b.safetensors:abc")
    with pytest.raises(qdiff.QdiffError, match="finite"):
        parse_lora("a/b.safetensors:inf")
