"""qdiff eval: same prompts and seeds across variants, SSIM/PSNR vs the reference, measured bytes, Shapes metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import qdiff
from qdiff.calib.metrics import ssim
from qdiff.config.recipe import SamplerConfig
from qdiff.errors import QdiffError
from qdiff.eval.report import grid_image, markdown_table, save_report
from qdiff.eval.run import Evaluator
from qdiff.eval.shapes import ShapesJudge, is_shapes_prompt_set, real_renders
from qdiff.eval.size import module_nbytes
from qdiff.models.tiny import tiny_sd_pipeline
from qdiff.sampling.draw import draw

SAMPLER = SamplerConfig(steps=2, guidance_scale=1.0)
PROMPTS = ["a photo of a cat", "a bowl of fruit", "a red car on a street"]


class MeanScorer:
    """Deterministic stand-in scorer: mean brightness (independent of the code under test)."""

    name = "mean"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def test_draw_images_is_batch_size_independent():
    pipe = tiny_sd_pipeline()
    a = draw(pipe, PROMPTS, [5, 6, 7], SAMPLER, batch_size=3)
    b = draw(pipe, PROMPTS, [5, 6, 7], SAMPLER, batch_size=1)
    assert a.shape == (3, 3, 64, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = draw(pipe, PROMPTS[:1], [8], SAMPLER, batch_size=1)
    assert not torch.allclose(a[:1], c)  # another seed, another image


def test_evaluator_reference_bytes_and_quantized_variant():
    ev = Evaluator(PROMPTS, SAMPLER, seed=5, batch_size=2, clip=MeanScorer(), quality=None, progress=False)
    fp = tiny_sd_pipeline()
    m_fp = ev.add("FP", fp)
    assert m_fp["denoiser_mib"] * 2**20 == module_nbytes(fp.unet)
    assert m_fp["s_per_image"] > 0 and "ssim" not in m_fp
    same = ev.add("FP again", tiny_sd_pipeline())
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6) and same["psnr"] > 80
    q = qdiff.quantize(tiny_sd_pipeline(), "w4a8", progress=False)
    m_q = ev.add("w4a8", q)
    assert m_q["denoiser_mib"] < 0.5 * m_fp["denoiser_mib"]
    images = draw(q, PROMPTS, [5, 6, 7], SAMPLER, 2)  # the evaluator's batch size
    assert m_q["ssim"] == pytest.approx(float(ssim(images, ev.images["FP"]).mean()), abs=1e-6)
    assert m_q["clip_score"] == pytest.approx(float(images.mean()), abs=1e-5)
    with pytest.raises(QdiffError, match="used twice"):
        ev.add("FP", fp)
    res = ev.result()
    assert list(res.metrics) == ["FP", "FP again", "w4a8"] and "real renders" not in res.metrics
    table = markdown_table(res)
    assert table.count("\n") == 4 and "| w4a8 |" in table and "Shapes-FID" not in table
    assert grid_image(res, rows=2, scale=1).size == (3 * (64 + 4) + 4, 16 + 2 * (64 + 4) + 4)


def test_auto_scorers_without_weights_are_noted_not_faked():
    ev = Evaluator(PROMPTS, SAMPLER, progress=False)  # coco-like prompts: open_clip / pyiqa weights are absent
    assert ev.scorers == {"clip_score": None, "quality": None}
    assert any("clip_score not measured" in n for n in ev.notes)
    with pytest.raises(QdiffError, match="Shapes metrics need Shapes captions"):
        Evaluator(PROMPTS, SAMPLER, shapes=True, progress=False)


def test_save_report_atomic_and_refuses_existing(tmp_path):
    ev = Evaluator(PROMPTS[:2], SAMPLER, clip=None, quality=None, progress=False)
    ev.add("FP", tiny_sd_pipeline())
    out = save_report(ev.result(), tmp_path / "rep", command="qdiff eval x")
    data = json.loads((out / "report.json").read_text())
    assert data["metrics"]["FP"]["denoiser_mib"] > 0 and data["seeds"] == [0, 1] and data["command"] == "qdiff eval x"
    assert "| FP |" in (out / "report.md").read_text()
    before = (out / "report.json").read_text()
    with pytest.raises(QdiffError, match="already exists"):
        save_report(ev.result(), out)
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temp folder left behind


def test_shapes_prompt_detection_and_renders():
    assert is_shapes_prompt_set(["a large red circle on the left", "there is a tiny azure box on top"])
    assert not is_shapes_prompt_set(["a large red circle", "a photo of a cat"])
    r = real_renders(["a large red circle on the left on a black background"] * 2, seed=3)
    assert r.shape == (2, 64, 64, 3) and r.dtype == np.uint8
    assert r[0, 32, 18, 0] > 200 and r[0, 32, 18, 2] < 80  # red at the left position
    assert r[0, 2, 2].max() < 40  # black background


@pytest.fixture(scope="module")
def judge():
    from qdiff.sampling.prompts import load_prompts

    return ShapesJudge(load_prompts("shapes-heldout", 64), seed=0)


def test_shapes_judge_real_renders_vs_noise(judge):
    real = judge.reference()
    assert min(real["acc_shape"], real["acc_colour"], real["acc_position"]) >= 0.95
    noise = judge(torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert noise["acc_colour"] < 0.5
    assert noise["shapes_fid"] > 5 * real["shapes_fid"]
    with pytest.raises(QdiffError, match="63 images for 64 prompts"):
        judge(torch.rand(63, 3, 64, 64))


def test_psnr_inf_is_json_null(tmp_path):
    ev = Evaluator(PROMPTS[:1], SAMPLER, clip=None, quality=None, progress=False)
    ev.add("a", tiny_sd_pipeline())
    ev.add("b", tiny_sd_pipeline())
    res = ev.result()
    assert math.isinf(res.metrics["b"]["psnr"])
    assert json.loads((save_report(res, tmp_path / "r") / "report.json").read_text())["metrics"]["b"]["psnr"] is None


BAD_COUNTS = [
    ({"num_prompts": 0}, "num_prompts must be a positive integer, got 0"),
    ({"batch_size": -2}, "batch_size must be a positive integer, got -2"),
    ({"num_prompts": True}, "num_prompts must be a positive integer"),
]


@pytest.mark.parametrize("kwargs,fragment", BAD_COUNTS)
def test_evaluate_rejects_bad_counts_before_loading_anything(kwargs, fragment, monkeypatch):
    monkeypatch.setattr("qdiff.export.resolve.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(QdiffError, match=fragment):
        qdiff.evaluate(["builtin:tiny-sd"], **kwargs)


def test_evaluator_rejects_zero_batch_size():
    with pytest.raises(QdiffError, match="batch_size must be a positive integer, got 0"):
        Evaluator(["a red circle"], SAMPLER, batch_size=0, clip=None, quality=None)
