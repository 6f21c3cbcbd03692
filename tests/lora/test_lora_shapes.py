"""The bundled Shapes LoRAs on the W8A8 Shapes model through diffusers' own API, against the float pipeline with the
same LoRAs; the quantized layers are untouched (bit-identical images after disable / unload); saving with unfused
adapters writes the export and the adapters beside it, and both come back bit for bit."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import qdiff
from qdiff.calib.metrics import ssim
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.export.resolve import load_pipeline
from qdiff.lora import load_saved_loras
from qdiff.models.shapes import data
from qdiff.models.shapes.pipeline import WEIGHTS_DIR
from qdiff.models.shapes.scorers import AttributeClassifier
from qdiff.sampling.draw import draw

LORAS = WEIGHTS_DIR / "loras"
BOTH = ["white-background", "large"]
SAMPLER = Recipe.load("shapes-w8a8").sampler
# held-out prompts that ask for a small shape on a black or gray background (what the two LoRAs override)
PROMPTS = [p for p, a in data.eval_prompts(64, 77) if a.background != 1 and a.size == 0][:4]


def _images(pipe) -> torch.Tensor:
    return draw(pipe, PROMPTS, list(range(len(PROMPTS))), SAMPLER, len(PROMPTS))


def _load(pipe, names=BOTH) -> None:
    for name in names:
        pipe.load_lora_weights(str(LORAS), weight_name=f"{name}.safetensors", adapter_name=name)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """(float pipeline, W8A8 pipeline, its export written before any LoRA, the W8A8 images before any LoRA)."""
    fp = load_pipeline("builtin:shapes")
    q = qdiff.quantize(load_pipeline("builtin:shapes"), "shapes-w8a8", progress=False)
    export = qdiff.save(q, tmp_path_factory.mktemp("shapes") / "w8a8")
    return fp, q, export, _images(q)


def test_runtime_loras_match_float_and_leave_the_frozen_layers(pipes):
    fp, q, _, base = pipes
    assert len(PROMPTS) == 4
    _load(fp)
    _load(q)
    clf = AttributeClassifier()
    for names, weights in ((["white-background"], [1.0]), (BOTH, [0.6, 0.8])):
        fp.set_adapters(names, weights)
        q.set_adapters(names, weights)
        lora_fp, lora_q = _images(fp), _images(q)
        assert float(ssim(lora_q, lora_fp).min()) > 0.97, (names, ssim(lora_q, lora_fp))
        pred_fp, pred_q = clf.predict(lora_fp), clf.predict(lora_q)
        assert (pred_fp[:, 4] == 1).all() and torch.equal(pred_q[:, 4], pred_fp[:, 4])  # white background
        if "large" in names:
            assert torch.equal(pred_q[:, 2], pred_fp[:, 2]) and (pred_fp[:, 2] == 1).sum() >= 3
    mixed = lora_q
    assert (mixed - base).abs().mean() > 0.1  # the LoRAs change the quantized model's images a lot
    q.disable_lora()
    assert torch.equal(_images(q), base)
    q.enable_lora()
    assert torch.equal(_images(q), mixed)
    with pytest.raises(QdiffError, match=r"^fuse_lora on a qdiff-quantized layer would re-quantize") as err:
        q.fuse_lora(lora_scale=0.5)
    assert "\n" not in str(err.value)
    assert torch.equal(_images(q), mixed)  # a refused fuse changes nothing
    q.set_adapters(["white-background"], [0.6])
    only_white = _images(q)
    q.set_adapters(BOTH, [0.6, 0.8])
    q.delete_adapters("large")
    assert torch.equal(_images(q), only_white)
    q.unload_lora_weights()
    assert torch.equal(_images(q), base)
    fp.unload_lora_weights()


def test_loaded_exports_take_loras_like_the_quantized_pipeline(pipes):
    """qdiff.load and diffusers' from_pretrained (qdiff backend): the same images as the in-memory W8A8 + LoRA."""
    from diffusers import DiffusionPipeline

    import qdiff.integrations.diffusers  # noqa: F401  (registers the backend)

    _, q, export, _ = pipes
    _load(q, ["white-background"])
    expected = _images(q)
    q.unload_lora_weights()
    for pipe in (qdiff.load(export), DiffusionPipeline.from_pretrained(export)):
        _load(pipe, ["white-background"])
        assert torch.equal(_images(pipe), expected)


def test_save_with_unfused_loras_keeps_export_and_adapters_apart(pipes, tmp_path, caplog):
    _, q, _, base = pipes
    _load(q)
    q.set_adapters(BOTH, [0.6, 0.8])
    mixed = _images(q)
    out = qdiff.save(q, tmp_path / "with-loras")
    manifest = json.loads((out / "qdiff.json").read_text())
    entry = manifest["lora_adapters"]
    assert [a["name"] for a in entry["adapters"]] == BOTH and entry["active"] == BOTH and entry["enabled"]
    assert [a["weights"] for a in entry["adapters"]] == [{"unet": 0.6}, {"unet": 0.8}]
    assert {a["file"] for a in entry["adapters"]} <= set(manifest["files"])
    assert not any("lora" in name or "base_layer" in name for name in manifest["layers"])
    from safetensors import safe_open

    with safe_open(str(out / "lora" / "adapter-0.safetensors"), "pt") as f:
        assert (
            all(k.startswith("unet.") and ".lora_" in k for k in f.keys()) and "lora_adapter_metadata" in f.metadata()
        )
    with caplog.at_level(logging.WARNING, logger="qdiff"):
        loaded = qdiff.load(out)
    assert "loaded without its unfused LoRA adapters (white-background, large" in caplog.text
    assert torch.equal(_images(loaded), base)  # the export is the model without the adapters
    assert load_saved_loras(loaded, out) == BOTH
    assert torch.equal(_images(loaded), mixed)

    q.disable_lora()  # save_pretrained: the same export, the disabled state recorded
    q.save_pretrained(tmp_path / "pretrained")
    again = qdiff.load(tmp_path / "pretrained")
    load_saved_loras(again, tmp_path / "pretrained")
    assert torch.equal(_images(again), base)
    again.enable_lora()
    assert torch.equal(_images(again), mixed)
    q.enable_lora()

    q.set_adapters(["large"], [{"unet": {"down": 0.5, "up": 1.0}}])  # per-block weights: one number cannot say it
    with pytest.raises(QdiffError, match="has per-block set_adapters weights"):
        qdiff.save(q, tmp_path / "per-block")
    assert not (tmp_path / "per-block").exists()
    q.unload_lora_weights()
    assert torch.equal(_images(q), base)
