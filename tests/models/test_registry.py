"""The family registry: one declaration per family, and everything derived from it (adapters, ``builtin:`` names,
the denoiser classes ``qdiff.load`` accepts, the default recipe). A new family is checked end to end through a
fresh registry swapped in for one block (``use_registry``), never by editing the module's state."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from types import MappingProxyType

import pytest
import torch
from conftest import generate

import qdiff
from qdiff.cli import _default_recipe
from qdiff.config.recipe import Recipe, bundled_recipes
from qdiff.errors import QdiffError
from qdiff.export.load import _denoiser_class
from qdiff.export.resolve import available_builtins, load_pipeline
from qdiff.models.adapters import CONTENT, QUALITY, find_denoiser, get_adapter
from qdiff.models.families import FAMILIES, FLUX, REGISTRY, UNET, current_registry, family_of, use_registry
from qdiff.models.layers import name_matches
from qdiff.models.registry import Architecture, Builtin, Family, Registry
from qdiff.quant.transform import quantized_layers

# --- the declarations ----------------------------------------------------------------------------------


def test_registry_is_immutable_data():
    assert isinstance(REGISTRY.families, tuple) and REGISTRY.families is FAMILIES
    assert isinstance(REGISTRY.builtins, MappingProxyType)
    with pytest.raises(TypeError):
        REGISTRY.builtins["x"] = "m:f"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        REGISTRY.families = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        UNET.protected = ()  # type: ignore[misc]
    assert current_registry() is REGISTRY


def test_builtins_are_derived_and_importable():
    assert available_builtins() == sorted(b.name for f in FAMILIES for b in f.builtins)
    assert {"shapes", "tiny-sd", "tiny-sdxl", "tiny-pixart", "tiny-flux-schnell", "tiny-sd3"} <= set(REGISTRY.builtins)
    for name, factory in REGISTRY.builtins.items():
        module, _, attr = factory.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
        assert family_of(f"builtin:{name}") is family_of(name) is not None


def test_load_accepts_exactly_the_declared_classes():
    assert REGISTRY.denoiser_classes == (
        "UNet2DConditionModel", "PixArtTransformer2DModel", "FluxTransformer2DModel", "SD3Transformer2DModel",
    )  # fmt: skip
    for arch in REGISTRY.architectures:
        for name in arch.classes:
            assert _denoiser_class(name, arch.attr, "qdiff.json").__name__ == name
    with pytest.raises(QdiffError, match=r"qdiff.json: denoiser.attr 'unet' does not match FluxTransformer2DModel"):
        _denoiser_class("FluxTransformer2DModel", "unet", "qdiff.json")
    with pytest.raises(
        QdiffError, match=r"qdiff.json: denoiser class 'UNet2DModel' is not supported \(supported: UNet"
    ):
        _denoiser_class("UNet2DModel", "unet", "qdiff.json")
    assert REGISTRY.denoiser_attrs == ("unet", "transformer")


def test_family_of_and_default_recipes():
    assert family_of("stabilityai/sdxl-turbo").name == "sdxl-turbo"
    assert family_of("builtin:tiny-flux-schnell").name == family_of("flux-schnell").name == "flux-schnell"
    assert family_of("builtin:nope") is None and family_of("org/unknown") is None and family_of(None) is None
    cases = {
        None: "shapes-w8a8",  # no model named: the bundled Shapes model
        "builtin:shapes": "shapes-w8a8",
        "stabilityai/sdxl-turbo": "sdxl-turbo-w8a8",
        "black-forest-labs/FLUX.1-schnell": "flux-schnell-w4a8",
        "PixArt-alpha/PixArt-LCM-XL-2-1024-MS": "pixart-lcm-w8a8",
        "builtin:tiny-sdxl-turbo": "w8a8",  # toy widths: the family recipes sample at the real resolution
        "builtin:tiny-sd": "w8a8",
        "org/unknown": "w8a8",
        "/some/folder": "w8a8",
    }
    assert {m: _default_recipe(m) for m in cases} == cases


def test_every_bundled_recipe_is_declared_once_and_fits_its_family():
    declared = [r for f in FAMILIES for r in f.recipes] + list(REGISTRY.generic_recipes)
    assert sorted(declared) == sorted(set(declared)) == bundled_recipes()
    assert REGISTRY.fallback_recipe in REGISTRY.generic_recipes
    for family in FAMILIES:
        assert family.default_recipe in family.recipes + REGISTRY.generic_recipes, family.name
        for name in family.recipes:
            recipe = Recipe.load(name)
            if recipe.model:  # a recipe that names its model names one of this family's
                assert family_of(recipe.model) is family, (name, recipe.model)
            assert not recipe.bos_aware or family.architecture.bos, name  # BOS-aware K/V needs a BOS token
    for name in REGISTRY.generic_recipes:
        assert Recipe.load(name).model is None, name


def test_registry_validation():
    fam = Family("a", UNET, builtins=(Builtin("x", "m:f"),))
    with pytest.raises(ValueError, match="family name 'a' is declared twice"):
        Registry((fam, fam))
    with pytest.raises(ValueError, match="builtin name 'x' is declared twice"):
        Registry((fam, dataclasses.replace(fam, name="b")))
    other_unet = dataclasses.replace(UNET, name="unet2")
    with pytest.raises(ValueError, match="denoiser class 'UNet2DConditionModel' is declared twice"):
        Registry((Family("a", UNET), Family("b", other_unet)))
    with pytest.raises(ValueError, match="two different architectures are named 'unet'"):
        Registry((Family("a", UNET), Family("b", dataclasses.replace(UNET, protected=()))))
    with pytest.raises(ValueError, match=r"architecture 'bad'.content: bad layer-name pattern 'a\.\.b'"):
        Architecture("bad", ("X",), "unet", content=("a..b",))
    with pytest.raises(ValueError, match="factory must be 'module:callable'"):
        Builtin("y", "no_colon")
    with pytest.raises(ValueError, match="recipes must be a tuple"):
        Family("c", UNET, recipes=["w8a8"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "**.attn2.to_k", True),
        ("attn2.to_k", "**.attn2.to_k", True),  # ** matches no part too
        ("down_blocks.0.attn2x.to_k", "**.attn2.to_k", False),  # whole parts only
        ("a.attn2.to_k.lora", "**.attn2.to_k", False),  # anchored at the end
        ("transformer_blocks.3.ff.net.2", "transformer_blocks.**.ff.**", True),
        ("caption_projection.ff.net", "transformer_blocks.**.ff.**", False),  # anchored at the start
        ("transformer_blocks.0.ff", "transformer_blocks.**.ff.**", True),
        ("conv_in", "conv_in", True),
        ("conv_in.x", "conv_in", False),
        ("single_transformer_blocks.7.proj_out", "single_transformer_blocks.*.proj_out", True),
        ("single_transformer_blocks.7.x.proj_out", "single_transformer_blocks.*.proj_out", False),  # * = one part
        ("x.attn.to_v", "**.attn.to_[kv]", True),
    ],
)
def test_name_patterns(name, pattern, expected):
    assert name_matches(name, (pattern,)) == expected
    assert name_matches(name, ("nothing", pattern)) == expected  # any of several


def test_import_stays_light():
    code = "import sys, qdiff.models.adapters, qdiff.models.families; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# --- a new family is one entry -------------------------------------------------------------------------

# A throwaway architecture over the UNet class with other rules (attn1 as content, only conv_in in float, no K/V,
# no split points), and a family with one builtin and its own default recipe.
TOY = Architecture(
    name="toy-unet", classes=("UNet2DConditionModel",), attr="unet",
    content=("**.attn1.**",), protected=("conv_in",), description="test only",
)  # fmt: skip
TOY_FAMILY = Family(
    name="toy", architecture=TOY, models=("example/toy-model",),
    builtins=(Builtin("toy-sd", "qdiff.models.tiny:tiny_sd_pipeline", toy=False),),
    default_recipe="w4a8",
)  # fmt: skip
TOY_REGISTRY = Registry((TOY_FAMILY,), generic_recipes=("w8a8", "w4a8"), fallback_recipe="w8a8")


def test_a_new_family_is_one_entry(tmp_path):
    with use_registry(TOY_REGISTRY):
        assert available_builtins() == ["toy-sd"]
        with pytest.raises(
            QdiffError, match=r"unknown builtin model 'builtin:tiny-sd'; available builtins: builtin:toy"
        ):
            load_pipeline("builtin:tiny-sd")
        pipe = load_pipeline("builtin:toy-sd")
        attr, den = find_denoiser(pipe)
        adapter = get_adapter(den)
        assert attr == "unet" and adapter is TOY and adapter.family == "toy-unet"
        infos = {i.name: i for i in adapter.layers(den)}
        assert [n for n, i in infos.items() if i.protected] == ["conv_in"]
        assert {n for n, i in infos.items() if i.group == CONTENT} == {n for n in infos if ".attn1." in n}
        assert all(i.group == QUALITY for n, i in infos.items() if ".attn2." in n)
        assert adapter.cross_attention_kv(den) == [] and all(i.a_split is None for i in infos.values())
        assert _default_recipe("builtin:toy-sd") == _default_recipe("example/toy-model") == "w4a8"
        assert _default_recipe("stabilityai/sdxl-turbo") == "w8a8"  # not a family of this registry

        qdiff.quantize(pipe, "w8a8", progress=False)
        assert "conv_out" in quantized_layers(den) and "conv_in" not in quantized_layers(den)
        out = qdiff.save(pipe, tmp_path / "toy")
        loaded = qdiff.load(out)
        assert torch.equal(generate(loaded, seed=3), generate(pipe, seed=3))
    manifest = (out / "qdiff.json").read_text()
    assert '"family": "toy-unet"' in manifest
    assert current_registry() is REGISTRY  # the swap ended with the block
    with use_registry(Registry((Family("flux-only", FLUX),))):  # load derives its classes from the registry too
        with pytest.raises(
            QdiffError, match=r"denoiser class 'UNet2DConditionModel' is not supported \(supported: Flux"
        ):
            qdiff.load(out)
    assert torch.equal(generate(qdiff.load(out), seed=3), generate(pipe, seed=3))  # default registry: a UNet


def test_with_families_returns_a_new_registry():
    extended = REGISTRY.with_families(dataclasses.replace(TOY_FAMILY, architecture=UNET))
    assert extended is not REGISTRY and extended.families[-1].name == "toy"
    assert "toy-sd" in extended.builtins and "toy-sd" not in REGISTRY.builtins
    assert extended.family_of("example/toy-model").name == "toy" and REGISTRY.family_of("example/toy-model") is None
    with pytest.raises(TypeError):
        with use_registry(FAMILIES):  # type: ignore[arg-type]
            pass
