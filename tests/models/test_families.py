"""Every bundled family recipe end to end on its tiny seeded instance: ``qdiff quantize`` from the CLI (in
process), the export reloads and gives bit-identical images to the in-memory quantized pipeline, the
recipe's scheduler is the one saved; ``qdiff calibrate`` -> ``qdiff quantize --calib`` once per denoiser kind.

The recipes' real settings (512-1024 px, 4 steps, 16 prompts) are shrunk in a derived YAML written in
``tmp_path`` (``_small``): 1-2 steps, 64 px (FLUX: 32 px), 2 calibration prompts.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qdiff
from qdiff.cli import main
from qdiff.config.recipe import Recipe, SamplerConfig
from qdiff.export.resolve import load_pipeline
from qdiff.models.adapters import find_denoiser
from qdiff.models.schedulers import SCHEDULER_CLASSES, apply_sampler_scheduler
from qdiff.quant.transform import quantized_layers
from qdiff.sampling.draw import sampler_kwargs

# (builtin model, bundled recipe, pipeline class of the real model)
CASES = [
    ("tiny-sdxl-turbo", "sdxl-turbo-1step-w8a8", "StableDiffusionXLPipeline"),
    ("tiny-sdxl-turbo", "sdxl-turbo-w4a8", "StableDiffusionXLPipeline"),
    ("tiny-sd-turbo", "sd-turbo-w8a8", "StableDiffusionPipeline"),
    ("tiny-sd-turbo", "sd-turbo-w4a8", "StableDiffusionPipeline"),
    ("tiny-lcm-dreamshaper", "lcm-dreamshaper-w8a8", "LatentConsistencyModelPipeline"),
    ("tiny-lcm-dreamshaper", "lcm-dreamshaper-w4a8", "LatentConsistencyModelPipeline"),
    ("tiny-pcm-sdxl", "pcm-sdxl-w8a8", "StableDiffusionXLPipeline"),
    ("tiny-pcm-sdxl", "pcm-sdxl-w4a8", "StableDiffusionXLPipeline"),
    ("tiny-pixart-lcm", "pixart-lcm-w8a8", "PixArtAlphaPipeline"),
    ("tiny-pixart-lcm", "pixart-lcm-w4a8", "PixArtAlphaPipeline"),
    ("tiny-flux-schnell", "flux-schnell-w4a8", "FluxPipeline"),
]
PROMPTS = ["a red cat sitting on a house", "a blue car in the snow"]


def _small(name: str, tmp_path, steps: int = 2) -> tuple[Recipe, str]:
    """The bundled recipe at toy size, written as YAML (what a user would pass to --recipe)."""
    recipe = Recipe.load(name)
    size = 32 if recipe.sampler.scheduler == "flow_euler" else 64
    small = recipe.replace(
        sampler=dataclasses.replace(recipe.sampler, steps=min(steps, recipe.sampler.steps), height=size, width=size),
        calibration=dataclasses.replace(recipe.calibration, num_prompts=2, batch_size=2),
        sensitivity=dataclasses.replace(recipe.sensitivity, fast_prompts=1),
    )
    if recipe.loras:  # the PCM recipes fuse their LoRA first: a seeded tiny LoRA stands in for the real file
        from qdiff.models.tiny_loras import write_tiny_lora

        lora = write_tiny_lora(load_pipeline("builtin:tiny-pcm-sdxl"), tmp_path / "pcm-lora.safetensors")
        small = small.replace(loras=(dataclasses.replace(recipe.loras[0], path=str(lora)),))
    path = tmp_path / f"{name}-small.yaml"
    small.save(path)
    return small, str(path)


def _images(pipe, sampler: SamplerConfig) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(7)
    return pipe(PROMPTS, generator=gen, output_type="pt", **sampler_kwargs(sampler)).images


def test_every_family_recipe_is_bundled_and_covered():
    """Every recipe the registry declares for a family (Shapes aside: tests/models/shapes) runs below on the
    family's tiny builtin, or is one of two that differ from a tested one only in the step count."""
    from qdiff.config.recipe import bundled_recipes
    from qdiff.models.families import FAMILIES, family_of

    family = {r for f in FAMILIES if f.name != "shapes" for r in f.recipes}
    assert {r for _, r, _ in CASES} | {"sdxl-turbo-w8a8", "sdxl-turbo-1step-w4a8"} == family
    assert family <= set(bundled_recipes())
    for builtin, recipe_name, _ in CASES:
        assert recipe_name in family_of(f"builtin:{builtin}").recipes, (builtin, recipe_name)
    for name in family:
        recipe = Recipe.load(name)
        assert recipe.sampler.scheduler in SCHEDULER_CLASSES and recipe.sampler.height and recipe.sampler.width
        assert recipe.allocation.w_budget == recipe.weights.bits and recipe.allocation.a_budget == 8
        assert recipe.qsched.alignment.startswith("open_clip:") and recipe.qsched.quality.startswith("pyiqa:")


@pytest.mark.parametrize("builtin, recipe_name, pipe_class", CASES)
def test_quantize_cli_and_bit_identical_reload(builtin, recipe_name, pipe_class, tmp_path, capsys):
    recipe, recipe_path = _small(recipe_name, tmp_path)
    out = tmp_path / "export"
    argv = ["quantize", "--model", f"builtin:{builtin}", "--recipe", recipe_path, "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"recipe     {recipe_name}" in capsys.readouterr().out

    reference = load_pipeline(f"builtin:{builtin}")  # the same quantization in memory
    assert type(reference).__name__ == pipe_class
    qdiff.quantize(reference, recipe, progress=False)
    loaded = qdiff.load(out)
    assert type(loaded).__name__ == pipe_class
    expected_scheduler = SCHEDULER_CLASSES[recipe.sampler.scheduler]
    assert type(loaded.scheduler).__name__ == type(reference.scheduler).__name__ == expected_scheduler
    assert torch.equal(_images(loaded, recipe.sampler), _images(reference, recipe.sampler))

    layers = quantized_layers(find_denoiser(loaded)[1])
    assert layers and {m.qcfg.w_bits for m in layers.values()} == {recipe.weights.bits}
    manifest = json.loads((out / "qdiff.json").read_text())
    assert manifest["recipe"]["sampler"]["scheduler"] == recipe.sampler.scheduler
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == expected_scheduler


def test_recipe_scheduler_is_swapped_and_saved(tmp_path):
    """builtin:tiny-sdxl ships trailing Euler; the SDXL-Turbo recipe swaps in EulerAncestral (trailing), keeps
    the noise schedule, and the export holds the swapped scheduler."""
    recipe, _ = _small("sdxl-turbo-1step-w8a8", tmp_path)
    pipe = load_pipeline("builtin:tiny-sdxl")
    before = dict(pipe.scheduler.config)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    qdiff.quantize(pipe, recipe, progress=False)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing"):
        assert pipe.scheduler.config[key] == before[key], key
    loaded = qdiff.load(qdiff.save(pipe, tmp_path / "out"))
    assert type(loaded.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert torch.equal(_images(loaded, recipe.sampler), _images(pipe, recipe.sampler))


def test_scheduler_swap_rules():
    pipe = load_pipeline("builtin:tiny-sd")  # LCMScheduler, leading
    assert not apply_sampler_scheduler(pipe, SamplerConfig())  # no choice: untouched
    assert not apply_sampler_scheduler(pipe, SamplerConfig(scheduler="lcm"))  # already that one
    assert apply_sampler_scheduler(pipe, SamplerConfig(scheduler="tcd", timestep_spacing="trailing"))
    assert type(pipe.scheduler).__name__ == "TCDScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(qdiff.QdiffError, match="sampler.scheduler: 'flow_euler' does not fit"):
        apply_sampler_scheduler(pipe, SamplerConfig(scheduler="flow_euler"))
    with pytest.raises(qdiff.QdiffError, match="sampler.scheduler: got 'heun'"):
        Recipe.from_dict({"sampler": {"scheduler": "heun"}})
    with pytest.raises(qdiff.QdiffError, match="sampler.timestep_spacing: got 'middle'"):
        Recipe.from_dict({"sampler": {"timestep_spacing": "middle"}})


@pytest.mark.parametrize(
    "builtin, recipe_name",
    [
        ("tiny-sdxl-turbo", "sdxl-turbo-w4a8"),
        ("tiny-pixart-lcm", "pixart-lcm-w4a8"),
        ("tiny-flux-schnell", "flux-schnell-w4a8"),
    ],
)
def test_calibrate_then_quantize_per_denoiser_kind(builtin, recipe_name, tmp_path, capsys):
    """unet / pixart / flux: MixDQ calibration (1 step, 2 prompts), then quantize with its plan and ranges."""
    recipe, recipe_path = _small(recipe_name, tmp_path, steps=1)
    calib, out = tmp_path / "calib", tmp_path / "export"
    argv = [
        "calibrate",
        "--model",
        f"builtin:{builtin}",
        "--recipe",
        recipe_path,
        "--out",
        str(calib),
        "--no-progress",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    plan = json.loads((calib / "plan.json").read_text())
    assert plan["meta"]["achieved_w_bits"] <= recipe.allocation.w_budget + 1e-9
    argv = ["quantize", "--model", f"builtin:{builtin}", "--calib", str(calib), "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    loaded = qdiff.load(out)
    layers = quantized_layers(find_denoiser(loaded)[1])
    assert {n: m.qcfg.w_bits for n, m in layers.items()} == {
        n: v["w_bits"] for n, v in plan["layers"].items() if v["w_bits"] is not None
    }
    assert type(loaded.scheduler).__name__ == SCHEDULER_CLASSES[recipe.sampler.scheduler]
    assert torch.isfinite(_images(loaded, recipe.sampler)).all()


def test_sd3_tiny_quantize_and_bit_identical_reload(tmp_path, capsys):
    """SD3 has no bundled few-step recipe yet: the generic W8A8 recipe (flow-matching scheduler kept) through the
    SD3 adapter, CLI export, bit-identical reload."""
    recipe = Recipe.load("w8a8")
    recipe = recipe.replace(sampler=dataclasses.replace(recipe.sampler, steps=2, height=64, width=64))
    path = tmp_path / "sd3.yaml"
    recipe.save(path)
    out = tmp_path / "export"
    argv = ["quantize", "--model", "builtin:tiny-sd3", "--recipe", str(path), "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    reference = qdiff.quantize(load_pipeline("builtin:tiny-sd3"), recipe, progress=False)
    loaded = qdiff.load(out)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline"
    assert json.loads((out / "qdiff.json").read_text())["denoiser"]["family"] == "sd3"
    assert torch.equal(_images(loaded, recipe.sampler), _images(reference, recipe.sampler))
