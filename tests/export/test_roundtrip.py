"""Export: save -> load is bit-exact; the loader refuses tampered, foreign or unknown-version folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import generate
from safetensors.torch import load_file

import qdiff
from qdiff.errors import QdiffError
from qdiff.export.manifest import FORMAT_VERSION, sha256_file
from qdiff.models.tiny import tiny_sd_pipeline
from qdiff.quant.transform import quantized_layers


@pytest.fixture(scope="module", params=["w8a8", "w4a8"])
def exported(request, tmp_path_factory):
    """(quantized pipeline, its export folder, images of the quantized pipeline)."""
    pipe = qdiff.quantize(tiny_sd_pipeline(seed=3), request.param, progress=False)
    out = qdiff.save(pipe, tmp_path_factory.mktemp("export") / "model")
    return pipe, out, generate(pipe, seed=11)


def _copy(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported[1], dst)
    return dst


def test_layout_and_manifest(exported):
    pipe, out, _ = exported
    for rel in ("model_index.json", "qdiff.json", "unet/config.json", "unet/qdiff.safetensors", "vae", "text_encoder"):
        assert (out / rel).exists(), rel
    manifest = json.loads((out / "qdiff.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["denoiser"] == {
        "attr": "unet", "class": "UNet2DConditionModel", "family": "unet", "weights": "unet/qdiff.safetensors"
    }  # fmt: skip
    layers = quantized_layers(pipe.unet)
    assert set(manifest["layers"]) == set(layers)
    for rel, digest in manifest["files"].items():
        assert sha256_file(out / rel) == digest
    assert not list(out.parent.glob(".model.tmp-*")), "temp folder left behind"


def test_packed_tensors_round_trip_bit_exact(exported):
    pipe, out, _ = exported
    loaded = qdiff.load(out)
    saved = load_file(str(out / "unet" / "qdiff.safetensors"))
    mine, theirs = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert set(mine) == set(theirs) == set(saved)
    for key, value in mine.items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key
        assert torch.equal(saved[key], value), key
    assert any(k.endswith("qweight") for k in mine)


def test_images_identical_after_load(exported):
    _, out, images = exported
    loaded = qdiff.load(out)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert torch.equal(generate(loaded, seed=11), images)


def test_load_with_a_kernel_preference(exported):
    """qdiff.load(kernel=...) overrides the recipe's backend preference; the spy shows it, the images stay equal."""
    from qdiff.backends.registry import recording

    _, out, images = exported
    loaded = qdiff.load(out, kernel="torch")
    assert {m.kernel for m in quantized_layers(loaded.unet).values()} == {"torch"}
    with recording() as calls:
        assert torch.equal(generate(loaded, seed=11), images)
    assert calls and {name for name, _ in calls} == {"torch"}
    with pytest.raises(QdiffError, match="kernel: got 'fast'"):
        qdiff.load(out, kernel="fast")


def test_resave_of_loaded_pipeline(exported, tmp_path):
    loaded = qdiff.load(exported[1])
    again = qdiff.save(loaded, tmp_path / "again")
    a = load_file(str(exported[1] / "unet/qdiff.safetensors"))
    b = load_file(str(again / "unet/qdiff.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rewrite_manifest(folder, change):
    path = folder / "qdiff.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_refuses_unknown_version(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    _rewrite_manifest(folder, lambda d: d.update(format_version=99))
    with pytest.raises(QdiffError, match=r"qdiff.json: format version 99 is not supported"):
        qdiff.load(folder)


def test_refuses_tampered_weights(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    path = folder / "unet" / "qdiff.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(QdiffError, match=r"unet/qdiff.safetensors: sha256 mismatch"):
        qdiff.load(folder)


def test_refuses_pickle_files(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(QdiffError, match=r"diffusion_pytorch_model.bin: refusing to load a .bin file"):
        qdiff.load(folder)


def test_refuses_missing_file(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(QdiffError, match=r"vae/config.json: listed in qdiff.json but missing"):
        qdiff.load(folder)


def test_refuses_garbage_safetensors_even_with_matching_hash(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    path = folder / "unet" / "qdiff.safetensors"
    path.write_bytes(b"\x00" * 64)
    _rewrite_manifest(folder, lambda d: d["files"].update({"unet/qdiff.safetensors": sha256_file(path)}))
    with pytest.raises(QdiffError, match=r"qdiff.safetensors: not a readable safetensors file"):
        qdiff.load(folder)


def test_refuses_shape_mismatch(exported, tmp_path):
    """A manifest edited to claim other bits (hashes re-signed) must not load silently."""
    folder = _copy(exported, tmp_path)

    def flip(d):
        entry = next(iter(d["layers"].values()))
        entry["quant"]["w_bits"] = 2 if entry["quant"]["w_bits"] != 2 else 8

    _rewrite_manifest(folder, flip)
    with pytest.raises(QdiffError, match=r"qdiff.safetensors: tensor '.*qweight' has shape"):
        qdiff.load(folder)


def test_not_an_export(tmp_path):
    with pytest.raises(QdiffError, match="not found"):
        qdiff.load(tmp_path / "nope")
    with pytest.raises(QdiffError, match=r"is not a qdiff export \(no qdiff.json\)"):
        qdiff.load(tmp_path)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    pipe = qdiff.quantize(tiny_sd_pipeline(seed=1), "w8a8", progress=False)
    import qdiff.export.save as save_mod

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_mod, "write_state_dict", boom)
    with pytest.raises(OSError, match="disk full"):
        qdiff.save(pipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp folder


def test_save_refuses_existing_folder_and_float_pipeline(tmp_path):
    (tmp_path / "out").mkdir()
    pipe = qdiff.quantize(tiny_sd_pipeline(seed=1), "w8a8", progress=False)
    with pytest.raises(QdiffError, match="already exists"):
        qdiff.save(pipe, tmp_path / "out")
    qdiff.save(pipe, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "qdiff.json").is_file()
    with pytest.raises(QdiffError, match="not quantized"):
        qdiff.save(tiny_sd_pipeline(seed=1), tmp_path / "float")


def test_half_precision_round_trip(tmp_path):
    """A bf16 pipeline exports and reloads with its dtypes, and draws the same images."""
    pipe = tiny_sd_pipeline(seed=2).to(dtype=torch.bfloat16)
    qdiff.quantize(pipe, "w4a8", progress=False)
    images = generate(pipe, seed=5)
    out = qdiff.save(pipe, tmp_path / "bf16")
    assert json.loads((out / "qdiff.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = qdiff.load(out)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.vae.dtype == torch.bfloat16
    assert torch.equal(generate(loaded, seed=5), images)
