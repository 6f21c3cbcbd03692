"""Recipe: YAML -> frozen dataclasses, strict validation with key paths, round trips."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from qdiff.config.recipe import ActivationConfig, Recipe, WeightConfig, bundled_recipes
from qdiff.errors import QdiffError

FAMILY_RECIPES = [
    "sdxl-turbo-w8a8", "sdxl-turbo-w4a8", "sdxl-turbo-1step-w8a8", "sdxl-turbo-1step-w4a8", "sd-turbo-w8a8",
    "sd-turbo-w4a8", "lcm-dreamshaper-w8a8", "lcm-dreamshaper-w4a8", "pcm-sdxl-w8a8", "pcm-sdxl-w4a8",
    "pixart-lcm-w8a8", "pixart-lcm-w4a8", "flux-schnell-w4a8",
]  # fmt: skip


@pytest.mark.parametrize(
    "name", ["w8a8", "w4a8", "w8a8-static", "mixdq-w8a8", "mixdq-w4a8", "mixdq-w3.66a16", *FAMILY_RECIPES]
)
def test_bundled_recipes_load_and_round_trip(name, tmp_path):
    recipe = Recipe.load(name)
    assert recipe.name == name
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert Recipe.load(path) == recipe
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_bundled_names_listed():
    assert {"w8a8", "w4a8"} <= set(bundled_recipes())


def test_frozen():
    recipe = Recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"weights": {"bits": 5}}, "recipe: weights.bits: got 5, allowed values are 2, 3, 4, 8"),
        ({"activations": {"bits": 6}}, "recipe: activations.bits: got 6, allowed values are 4, 8, 16"),
        ({"weights": {"bitz": 8}}, "recipe: weights.bitz: unknown key; allowed keys are"),
        ({"colour": 1}, "recipe: colour: unknown key"),
        ({"weights": {"bits": "8"}}, "recipe: weights.bits: must be an integer, got str '8'"),
        ({"weights": {"bits": True}}, "recipe: weights.bits: must be an integer"),
        ({"sampler": {"steps": 0}}, "recipe: sampler.steps: must be > 0"),
        ({"sampler": {"height": 60}}, "recipe: sampler.height: must be a positive multiple of 8"),
        ({"sampler": {"width": 0}}, "recipe: sampler.width: must be a positive multiple of 8"),
        ({"sampler": {"guidance_scale": -1.0}}, "recipe: sampler.guidance_scale: must be >= 0, got -1.0"),
        ({"sampler": {"guidance_scale": float("nan")}}, "recipe: sampler.guidance_scale: must be a finite number"),
        ({"calibration": {"num_prompts": 0}}, "recipe: calibration.num_prompts: must be > 0"),
        ({"calibration": {"batch_size": -1}}, "recipe: calibration.batch_size: must be > 0"),
        ({"qsched": {"k": float("inf")}}, "recipe: qsched.k: must be a finite number, got inf"),
        ({"qsched": {"min_gain": float("nan")}}, "recipe: qsched.min_gain: must be a finite number"),
        ({"activations": {"momentum": float("nan")}}, "recipe: activations.momentum: must be in [0, 1)"),
        ({"allocation": {"w_budget": float("nan")}}, "recipe: allocation.w_budget: must be in [1, 16] bits"),
        ({"weights": {"granularity": "group"}}, "recipe: weights.group_size: got None, allowed values are 32, 64"),
        ({"weights": {"group_size": 64}}, "recipe: weights.group_size: only allowed with granularity: group"),
        ({"activations": {"mode": "weird"}}, "recipe: activations.mode: got 'weird', allowed values are 'dynamic'"),
        ({"kernel": "cuda"}, "recipe: kernel: got 'cuda', allowed values are 'auto', 'triton', 'cpu_int8', 'torch'"),
        ({"skip": "conv_in"}, "recipe: skip: must be a list"),
        ({"weights": [8]}, "recipe: weights: must be a mapping"),
        ([1, 2], "recipe: (top level): must be a mapping"),
    ],
)
def test_validation_names_key_path(data, fragment):
    with pytest.raises(QdiffError) as info:
        Recipe.from_dict(data)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_sections_validate_at_construction():
    with pytest.raises(QdiffError, match="weights.bits"):
        WeightConfig(bits=7)
    with pytest.raises(QdiffError, match="activations.momentum"):
        ActivationConfig(momentum=1.5)


def test_unknown_recipe_name_lists_bundled():
    with pytest.raises(QdiffError, match="not a bundled recipe .*w8a8"):
        Recipe.load("no-such-recipe")


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("weights: {bits: 8\n")
    with pytest.raises(QdiffError, match="not valid YAML"):
        Recipe.load(path)
