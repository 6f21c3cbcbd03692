"""Scorers: open_clip CLIP-score math on a tiny random model, offline errors, pyiqa signs, the registry."""

from __future__ import annotations

import json
import time

import pytest
import torch

from qdiff.errors import QdiffError
from qdiff.sched.scorers import OpenClipScorer, PyiqaScorer, clip_preprocess, make_scorer

TINY = "qdiff-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("clip") / f"{TINY}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return OpenClipScorer(TINY, None, allow_random=True)


def test_clip_score_math(tiny_clip):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 40, 48, generator=g)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    got = tiny_clip.score(images, prompts)
    x = clip_preprocess(images, 32, tiny_clip.mean, tiny_clip.std)
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        img = tiny_clip.model.encode_image(x).double()
        txt = tiny_clip.model.encode_text(tiny_clip.tokenizer(prompts)).double()
    cos = (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))
    expected = 100.0 * torch.where(cos > 0, cos, torch.zeros_like(cos))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert got.shape == (3,)
    with pytest.raises(QdiffError, match="3 images but 2 prompts"):
        tiny_clip.score(images, prompts[:2])


def test_clip_preprocess_identity_at_model_size():
    x = torch.rand(2, 3, 32, 32)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = clip_preprocess(x, 32, mean, std)
    ref = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_clip_weights_absent_are_clear_errors(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(QdiffError, match="no weights given"):
        OpenClipScorer("ViT-B-32")
    with pytest.raises(QdiffError, match="not in the local cache and qdiff does not download"):
        OpenClipScorer("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(QdiffError, match="not found"):
        OpenClipScorer("ViT-B-32", str(tmp_path / "missing.safetensors"))
    (tmp_path / "w.bin").write_bytes(b"\0")
    with pytest.raises(QdiffError, match="only .safetensors is loaded"):
        OpenClipScorer("ViT-B-32", str(tmp_path / "w.bin"))
    with pytest.raises(QdiffError, match="unknown pretrained tag 'nope'"):
        OpenClipScorer("ViT-B-32", "nope")
    with pytest.raises(QdiffError, match="architecture 'ViT-Nope' is unknown"):
        make_scorer("open_clip:ViT-Nope:x")
    assert time.perf_counter() - t0 < 10  # nothing tried the network


def test_pyiqa_offline_metrics_and_signs():
    import pyiqa

    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    piqe = make_scorer("pyiqa:piqe")
    raw = pyiqa.create_metric("piqe", device="cpu")(x).reshape(-1)
    torch.testing.assert_close(piqe.score(x, ["a", "b"]), -raw.float())  # lower-is-better -> negated
    entropy = PyiqaScorer("entropy")
    assert entropy.sign == 1.0 and entropy.score(x, ["a", "b"]).shape == (2,)
    flat = torch.full((1, 3, 48, 48), 0.5)
    assert entropy.score(flat, ["a"]) < entropy.score(x[:1], ["a"])  # a flat image has less entropy than noise


def test_pyiqa_weights_absent_is_clear_error():
    t0 = time.perf_counter()
    with pytest.raises(QdiffError, match="pyiqa:clipiqa: cannot build the metric offline"):
        PyiqaScorer("clipiqa")
    with pytest.raises(QdiffError, match="not a pyiqa no-reference metric"):
        PyiqaScorer("psnr")
    assert time.perf_counter() - t0 < 20


def test_shapes_scorers_rank_true_captions_and_clean_images():
    import numpy as np

    from qdiff.models.shapes import data
    from qdiff.models.shapes.train import degrade

    pairs = data.eval_prompts(64, seed=99)
    caps = [c for c, _ in pairs]
    rng = np.random.default_rng(0)
    real = torch.from_numpy(np.stack([data.render(a, rng) for _, a in pairs])).permute(0, 3, 1, 2).float() / 255
    clip, quality = make_scorer("shapes-clip"), make_scorer("shapes-quality")
    assert clip.name == "shapes-clip" and quality.name == "shapes-quality"
    true, wrong = clip.score(real, caps), clip.score(real, caps[1:] + caps[:1])
    assert true.shape == (64,) and float((true > wrong).float().mean()) >= 0.95 and float(true.min()) >= 0
    bad = (degrade(real * 2 - 1, torch.Generator().manual_seed(0)) + 1) / 2
    assert float((quality.score(real, caps) > quality.score(bad, caps)).float().mean()) >= 0.9
    with pytest.raises(QdiffError, match="scorer shapes-clip: cannot load its weights from /nonexistent"):
        make_scorer("shapes-clip:/nonexistent")


def test_registry(tiny_clip):
    with pytest.raises(QdiffError, match="unknown scorer 'blip'; families: open_clip, pyiqa, shapes-clip"):
        make_scorer("blip")
    assert make_scorer(tiny_clip) is tiny_clip  # objects pass through
    custom = make_scorer("mine:3", extra={"mine": lambda arg: tiny_clip})
    assert custom is tiny_clip
