"""Fast tests of the procedural Shapes data (no training)."""

from __future__ import annotations

import numpy as np
import torch

from qdiff.models.shapes import data


def test_render_shape_dtype_and_determinism() -> None:
    a = data.Attributes(shape=3, colour=0, size=1, position=4, background=0)
    x1 = data.render(a, np.random.default_rng(5))
    x2 = data.render(a, np.random.default_rng(5))
    assert x1.shape == (64, 64, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2)
    assert not np.array_equal(x1, data.render(a, np.random.default_rng(6)))  # jitter depends on the seed


def test_render_colours_and_position() -> None:
    a = data.Attributes(
        shape=1,
        colour=data.COLOURS.index("red"),
        size=1,
        position=data.POSITIONS.index("left"),
        background=data.BACKGROUNDS.index("white"),
    )
    x = data.render(a, jitter=False).astype(int)
    assert tuple(x[0, 0]) == data.BACKGROUND_RGB["white"]
    assert tuple(x[32, 18]) == data.COLOUR_RGB["red"]  # centre of the left position
    assert tuple(x[32, 56]) == data.BACKGROUND_RGB["white"]


def test_sizes_are_visible_in_latents() -> None:
    assert min(data.SIZE_PX.values()) >= 16
    assert len(data.SHAPES) >= 5 and len(data.COLOURS) >= 8 and len(data.POSITIONS) >= 5


def test_make_batch_is_seeded() -> None:
    x, caps, y = data.make_batch(16, seed=3)
    x2, caps2, y2 = data.make_batch(16, seed=3)
    assert x.shape == (16, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, x2) and caps == caps2 and torch.equal(y, y2)
    assert y.shape == (16, 5)


def test_heldout_split() -> None:
    held = data.all_combinations("heldout")
    train = data.all_combinations("train")
    assert len(held) + len(train) == 1200
    assert 0.05 < len(held) / 1200 < 0.15
    # every attribute pair is still seen in training
    for i in range(5):
        for j in range(i + 1, 5):
            seen = {(a.as_tuple()[i], a.as_tuple()[j]) for a in train}
            assert len(seen) == data.NUM_CLASSES[i] * data.NUM_CLASSES[j]
    _, _, y = data.make_batch(64, seed=1, split="train")
    assert not any(data.is_heldout(data.Attributes(*map(int, r))) for r in y)


def test_captions_parse_back_to_labels() -> None:
    rng = np.random.default_rng(0)
    for templates in (data.TRAIN_TEMPLATES, data.HELDOUT_TEMPLATES):
        for _ in range(200):
            a = data.sample_attributes(rng, "all")
            cap = data.caption(a, rng, templates)
            parsed = data.parse_caption(cap)
            truth = dict(zip(data.ATTRIBUTE_KEYS, a.as_tuple()))
            assert {k: truth[k] for k in parsed} == parsed, cap
            assert set(parsed) >= {"shape", "colour", "size", "position"}, cap


def test_eval_prompts_are_heldout() -> None:
    prompts = data.eval_prompts(256)
    assert len(prompts) == 256
    assert all(data.is_heldout(a) for _, a in prompts)
    train_prefixes = {t.split("{")[0] for t in data.TRAIN_TEMPLATES}
    assert all(p.startswith(("there is", "a picture of")) for p, _ in prompts)
    assert "there is " not in train_prefixes
    assert data.canonical_caption(prompts[0][1]).startswith("a ")


def test_bundled_prompt_sets_are_regenerable_and_disjoint():
    from qdiff.sampling.prompts import load_prompts

    cal, held = load_prompts("shapes"), load_prompts("shapes-heldout")
    assert cal == data.calibration_prompts(64, seed=2026)
    assert held == [c for c, _ in data.eval_prompts(256, seed=1234)]
    assert not set(cal) & set(held)
    for p in cal:  # every calibration prompt names at least shape, colour, size and position
        named = data.parse_caption(p)
        assert {"shape", "colour", "size", "position"} <= set(named)
    templates = {t.split("{")[0].strip() for t in data.HELDOUT_TEMPLATES}
    assert all(any(p.startswith(t) for t in templates) for p in held)
