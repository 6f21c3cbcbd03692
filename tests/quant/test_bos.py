"""BOS-aware cross-attention K/V: token 0 in full precision, excluded from the activation quantizer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import qdiff
from qdiff.calib.bos_probe import kv_layers, plant_bos_outlier, probe_bos
from qdiff.calib.metrics import sqnr_db, ssim
from qdiff.config.layer import LayerQuant
from qdiff.config.recipe import Recipe
from qdiff.models.adapters import get_adapter
from qdiff.models.tiny import tiny_pixart_pipeline, tiny_sd_pipeline
from qdiff.quant.bos import BOSQuantLinear
from qdiff.quant.modules import QuantLinear
from qdiff.sampling.draw import draw


def _recipe(bos: bool) -> Recipe:
    r = Recipe.load("w8a8-static")
    return r.replace(
        bos_aware=bos,
        sampler=dataclasses.replace(r.sampler, steps=2),
        calibration=dataclasses.replace(r.calibration, num_prompts=4, batch_size=4),
    )


@pytest.mark.parametrize("mode", ["cached", "per_call"])
def test_bos_row_full_precision_rest_quantized(mode, gen):
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 16, generator=gen))
    x = torch.randn(3, 5, 16, generator=gen)
    x[:, 0] = torch.randn(16, generator=gen) * 50  # the same BOS outlier in every sample
    q = LayerQuant(w_bits=4, a_bits=8, a_mode="dynamic")
    m = BOSQuantLinear.from_float(lin, q)
    m.set_bos(mode, x[0, 0])
    ref = QuantLinear.from_float(lin, q)
    fake = m(x)
    fp_row = (x[:, :1].double() @ lin.weight.double().T + lin.bias.double()).float()
    torch.testing.assert_close(fake[:, :1], fp_row, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fake[:, 1:], ref(x[:, 1:]))  # tokens 1.. exactly the plain quantized path
    before = m.nbytes()
    m.freeze()
    # bytes as frozen, before the first call (on cpu_int8 that call moves the codes into its prepacked copy, whose
    # accounting tests/backends/test_resident.py checks)
    extra = 8 * 4 if mode == "cached" else 8 * 16 * 4  # fp32 row vs fp32 weight copy, counted honestly
    assert "bos_row" in dict(m.named_buffers()) if mode == "cached" else "bos_weight" in dict(m.named_buffers())
    assert m.nbytes() == sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()))
    assert any(b.numel() * b.element_size() == extra for b in m.buffers())
    # cached: a packed layer plus one fp32 row is smaller than float; per_call keeps a float copy: larger
    assert (m.nbytes() < before) if mode == "cached" else (m.nbytes() > before)
    torch.testing.assert_close(m(x), fake, rtol=1e-4, atol=1e-4)


def test_probe_checks_prompt_independence():
    sd = tiny_sd_pipeline(seed=0)  # causal CLIP: token 0 is the same for every prompt
    kv = kv_layers(sd.unet, get_adapter(sd.unet))
    probe = probe_bos(sd, kv, ["", "a cat", "a red house in the snow at night"], _recipe(True).sampler)
    assert probe.invariant and probe.mode == "cached" and set(probe.embeddings) == set(kv)
    pix = tiny_pixart_pipeline(seed=0)  # T5 is bidirectional and has no BOS: token 0 depends on the prompt
    kv = kv_layers(pix.transformer, get_adapter(pix.transformer))
    probe = probe_bos(pix, kv, ["a cat", "a red house in the snow at night"], _recipe(True).sampler)
    assert not probe.invariant and probe.mode == "per_call" and probe.max_rel_dev > 1e-2


def _images(pipe):
    return draw(pipe, ["a red cat on the beach", "a dog"], None, _recipe(False).sampler, 2)


def _kv_outputs(pipe, names):
    outs = {}
    hooks = [
        pipe.unet.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: outs.setdefault(n, []).append(o))
        for n in names
    ]
    images = _images(pipe)
    for h in hooks:
        h.remove()
    return images, {n: torch.cat(v) for n, v in outs.items()}


def test_planted_bos_outlier_sqnr_and_ssim(tmp_path):
    """Token 0 scaled 50x (real CLIP: ~800 vs ~10-15): BOS-aware static W8A8 keeps K/V close to FP."""
    results = {}
    for bos in (False, True):
        pipe = tiny_sd_pipeline(seed=0)
        plant_bos_outlier(pipe.text_encoder, 50.0)
        names = get_adapter(pipe.unet).cross_attention_kv(pipe.unet)
        fp_images, fp_kv = _kv_outputs(pipe, names)
        qdiff.quantize(pipe, _recipe(bos), progress=False)
        q_images, q_kv = _kv_outputs(pipe, names)
        kv_sqnr = min(sqnr_db(fp_kv[n], q_kv[n]) for n in names)
        results[bos] = (kv_sqnr, float(ssim(fp_images, q_images).mean()), pipe)
    (off_sqnr, off_ssim, _), (on_sqnr, on_ssim, pipe) = results[False], results[True]
    # measured here: worst K/V SQNR 27.4 dB off -> 56.7 dB on; image SSIM 0.9983 -> 0.9984
    assert on_sqnr > off_sqnr + 20.0, (off_sqnr, on_sqnr)
    assert on_ssim >= off_ssim - 1e-4
    # export keeps the BOS rows; old manifests without the field still load (tests/export)
    out = qdiff.save(pipe, tmp_path / "bos")
    manifest = json.loads((out / "qdiff.json").read_text())
    modes = {n: e["bos"] for n, e in manifest["layers"].items() if e["bos"] != "none"}  # format 2: always written
    assert set(modes) == set(get_adapter(pipe.unet).cross_attention_kv(tiny_sd_pipeline(seed=0).unet))
    assert set(modes.values()) == {"cached"}
    back = qdiff.load(out)
    plant_bos_outlier(back.text_encoder, 50.0)
    torch.testing.assert_close(_images(back), _images(pipe))
