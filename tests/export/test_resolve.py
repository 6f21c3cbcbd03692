"""load_pipeline: builtins, local folders, qdiff exports, the local hub cache, and one-line errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from qdiff.errors import QdiffError  # noqa: E402
from qdiff.export.resolve import available_builtins, load_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    load_pipeline("builtin:tiny-sd").save_pretrained(folder)
    return folder


def _error(spec, **kw):
    with pytest.raises(QdiffError) as err:
        load_pipeline(spec, **kw)
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_builtins():
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    assert {"tiny-sd", "tiny-sdxl", "tiny-pixart"} <= set(available_builtins())
    assert isinstance(load_pipeline("builtin:tiny-sd"), StableDiffusionPipeline)
    assert isinstance(load_pipeline("builtin:tiny-sdxl"), StableDiffusionXLPipeline)
    assert isinstance(load_pipeline(" builtin:tiny-pixart "), PixArtAlphaPipeline)


def test_builtin_dtype():
    pipe = load_pipeline("builtin:tiny-sd", torch_dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert load_pipeline("builtin:tiny-sd", torch_dtype=torch.float16).vae.dtype == torch.float16
    assert "unknown dtype" in _error("builtin:tiny-sd", torch_dtype="int3")


def test_unknown_builtin_lists_available():
    msg = _error("builtin:nope")
    assert "builtin:nope" in msg and "builtin:tiny-sd" in msg and "builtin:tiny-pixart" in msg


def test_builtin_records_its_name_and_unavailable_factory():
    from qdiff.models.families import REGISTRY, UNET, use_registry
    from qdiff.models.registry import Builtin, Family

    pipe = load_pipeline("builtin:tiny-sd")
    assert pipe.name_or_path == "builtin:tiny-sd"
    broken = Family("broken", UNET, builtins=(Builtin("broken", "qdiff.no_such_module:f"),))
    with use_registry(REGISTRY.with_families(broken)):
        assert "builtin:broken is unavailable" in _error("builtin:broken")
    assert "unknown builtin model 'builtin:broken'" in _error("builtin:broken")  # the swap ended with the block


def test_local_folder_round_trip(sd_folder):
    pipe = load_pipeline(str(sd_folder))
    fresh = load_pipeline("builtin:tiny-sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    for comp in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(pipe, comp), getattr(fresh, comp)), comp
    kw = dict(num_inference_steps=2, guidance_scale=0.0, height=64, width=64, output_type="pt")
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    b = fresh("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    # Weights are bit-identical, but safetensors loads them at unaligned addresses and the CPU GEMM
    # kernels round differently for unaligned buffers, so outputs agree only to float precision.
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    half = load_pipeline(sd_folder, torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16


def test_missing_folder():
    msg = _error("./no/such/folder")
    assert "does not exist" in msg and "builtin:tiny-sd" in msg
    assert "does not exist" in _error("/definitely/not/here")


def test_file_and_non_pipeline_folder(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    # a file is a single-file checkpoint: without configs it asks for --config (tests/models/test_single_file.py)
    assert "needs the pipeline configs: pass --config FOLDER" in _error(str(tmp_path / "weights.safetensors"))
    assert "model_index.json" in _error(str(tmp_path))


def test_pickled_weights_are_refused(tmp_path):
    pipe = load_pipeline("builtin:tiny-sd")
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    # diffusers components are pickled (.bin); transformers 5 always writes safetensors for the text encoder
    assert list((tmp_path / "bin" / "unet").glob("*.bin"))
    assert not list((tmp_path / "bin" / "unet").glob("*.safetensors"))
    msg = _error(str(tmp_path / "bin"))
    assert "could not load" in msg and "safetensors" in msg


def test_hub_id_not_cached(tmp_path):
    msg = _error("stabilityai/sdxl-turbo", cache_dir=tmp_path)
    assert msg.startswith("model 'stabilityai/sdxl-turbo' not found")
    assert "huggingface-cli download stabilityai/sdxl-turbo" in msg and "builtin:tiny-sd" in msg
    assert "not found" in _error("not a valid id!", cache_dir=tmp_path)


def test_hub_id_from_local_cache(tmp_path, sd_folder):
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--qdiff-test--tiny-sd"
    shutil.copytree(sd_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    pipe = load_pipeline("qdiff-test/tiny-sd", cache_dir=tmp_path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert _same_weights(pipe.unet, load_pipeline("builtin:tiny-sd").unet)


def test_qdiff_export_goes_to_load_export(tmp_path, monkeypatch):
    import qdiff.export.load as export_load

    seen = []
    monkeypatch.setattr(export_load, "load_export", lambda path, *a, **k: seen.append(path) or "EXPORTED")
    (tmp_path / "qdiff.json").write_text("{}")
    assert load_pipeline(str(tmp_path)) == "EXPORTED"
    assert [str(p) for p in seen] == [str(tmp_path)]

    def broken(path, *a, **k):
        raise KeyError("denoiser")

    monkeypatch.setattr(export_load, "load_export", broken)
    assert "could not load the qdiff export" in _error(str(tmp_path))
