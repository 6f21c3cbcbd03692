"""qdiff as a diffusers quantization backend: exports load with from_pretrained, quantize on load, card, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qdiff
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.export.resolve import load_pipeline
from qdiff.sampling.draw import draw

dm = pytest.importorskip("qdiff.integrations.diffusers")
from diffusers import DiffusionPipeline, PipelineQuantizationConfig  # noqa: E402
from diffusers.quantizers import auto  # noqa: E402

FAMILIES = {"tiny-sd": "unet", "tiny-pixart": "transformer"}  # every test
MORE = ["tiny-sdxl", "tiny-sdxl-turbo", "tiny-sd-turbo", "tiny-lcm-dreamshaper", "tiny-pcm-sdxl", "tiny-pixart-lcm"]
MORE += ["tiny-flux-schnell", "tiny-sd3"]  # the load / quantize-on-load identities on every other family


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """builtin -> (float pipeline folder, qdiff export folder, in-memory quantized pipeline), made on first use."""
    root, cache = tmp_path_factory.mktemp("diffusers"), {}

    def get(name: str):
        if name not in cache:
            load_pipeline(f"builtin:{name}").save_pretrained(root / f"{name}-float")
            pipe = qdiff.quantize(load_pipeline(f"builtin:{name}"), "w8a8", progress=False)
            cache[name] = (root / f"{name}-float", qdiff.save(pipe, root / f"{name}-w8a8"), pipe)
        return cache[name]

    return get


def _denoiser(pipe) -> torch.nn.Module:
    from qdiff.models.adapters import find_denoiser

    return find_denoiser(pipe)[1]


def _image(pipe) -> torch.Tensor:
    return draw(pipe, ["a red square"], [0], Recipe.load("w8a8").sampler, 1)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_registered_only_on_import():
    assert auto.AUTO_QUANTIZER_MAPPING["qdiff"] is dm.QdiffQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["qdiff"] is dm.QdiffConfig
    code = "import qdiff, sys; assert 'diffusers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_config_round_trips_through_dict():
    cfg = dm.QdiffConfig(recipe="w4a8", calib="cal")
    again = auto.DiffusersAutoQuantizer.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert isinstance(again, dm.QdiffConfig) and again.to_dict() == cfg.to_dict()
    assert again.quant_method.value == "qdiff"
    with pytest.raises(QdiffError, match=r"QdiffConfig: unknown argument 'bits'"):
        dm.QdiffConfig(bits=4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_the_diffusers_way(made, name):
    _, export, in_memory = made(name)
    attr = FAMILIES[name]
    config = json.loads((export / attr / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "qdiff", "format_version": 2, "recipe": "w8a8"}
    via_diffusers = DiffusionPipeline.from_pretrained(export)
    via_qdiff = qdiff.load(export)
    den_cls = type(getattr(via_qdiff, attr))
    alone = den_cls.from_pretrained(export, subfolder=attr)
    for pipe_den in (getattr(via_diffusers, attr), alone):
        _assert_same_state(pipe_den, getattr(via_qdiff, attr))
        assert pipe_den.is_quantized and qdiff.quant.transform.get_info(pipe_den).recipe.name == "w8a8"
    ref = _image(in_memory)
    assert torch.equal(_image(via_diffusers), ref) and torch.equal(_image(via_qdiff), ref)


def test_tampered_export_refused_with_qdiff_error(made, tmp_path):
    _, export, _ = made("tiny-sd")
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    data = bytearray((bad / "unet" / "qdiff.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "unet" / "qdiff.safetensors").write_bytes(bytes(data))
    with pytest.raises(QdiffError, match=r"qdiff.safetensors: sha256 mismatch"):
        DiffusionPipeline.from_pretrained(bad)
    (bad / "unet" / "extra.bin").write_bytes(b"x")
    with pytest.raises(QdiffError, match=r"extra.bin: refusing to load a .bin file"):
        type(made("tiny-sd")[2].unet).from_pretrained(bad, subfolder="unet")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_quantize_on_load_equals_qdiff_quantize(made, name):
    floating, _, in_memory = made(name)
    attr = FAMILIES[name]
    quant = PipelineQuantizationConfig(quant_mapping={attr: dm.QdiffConfig(recipe="w8a8")})
    pipe = DiffusionPipeline.from_pretrained(floating, quantization_config=quant)
    _assert_same_state(getattr(pipe, attr), getattr(in_memory, attr))


def test_static_recipe_without_ranges_says_calibrate(made):
    floating, _, _ = made("tiny-sd")
    quant = PipelineQuantizationConfig(quant_mapping={"unet": dm.QdiffConfig(recipe="w8a8-static")})
    with pytest.raises(QdiffError, match=r"run `qdiff calibrate .*QdiffConfig\(calib='DIR'\)"):
        DiffusionPipeline.from_pretrained(floating, quantization_config=quant)


def test_save_pretrained_points_to_qdiff_save(made, tmp_path):
    _, export, _ = made("tiny-sd")
    pipe = DiffusionPipeline.from_pretrained(export)
    with pytest.raises(QdiffError, match=r"use qdiff.save\(pipe, DIR\)"):
        pipe.save_pretrained(tmp_path / "out")


def test_card_is_hashed_and_measured(made):
    _, export, _ = made("tiny-sd")
    manifest = json.loads((export / "qdiff.json").read_text())
    assert (
        "README.md" in manifest["files"] and "unet/diffusion_pytorch_model.safetensors.index.json" in manifest["files"]
    )
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\nbase_model: builtin:tiny-sd\ntags:\n- qdiff\n- quantized\n")
    assert f"| 8 | 8 | channel | {len(manifest['layers'])} |" in card
    stored = sum(p.stat().st_size for p in (export / "unet").glob("qdiff*.safetensors"))
    line = next(x for x in card.splitlines() if x.startswith("Denoiser tensors:"))
    counted = int(line.split()[2].replace(",", ""))
    assert 0 < stored - counted < 64 * 1024  # the files hold the tensors plus their JSON headers


def test_to_device_and_cpu_offload(made):
    """``.to``, model offload and (per module, as enable_sequential_cpu_offload installs it) sequential offload,
    on CPU. The whole-pipeline sequential offload fails on this accelerate/transformers for the float tiny pipeline
    too (the CLIP text encoder's embedding), so the denoiser is offloaded alone."""
    from accelerate import cpu_offload

    _, export, in_memory = made("tiny-sd")
    ref = _image(in_memory)
    assert torch.equal(_image(DiffusionPipeline.from_pretrained(export).to("cpu")), ref)
    pipe = DiffusionPipeline.from_pretrained(export)
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(_image(pipe), ref)
    pipe = DiffusionPipeline.from_pretrained(export)
    cpu_offload(pipe.unet, torch.device("cpu"), offload_buffers=True)
    assert torch.equal(_image(pipe), ref)
    if torch.cuda.is_available():
        pipe = DiffusionPipeline.from_pretrained(export)
        pipe.enable_model_cpu_offload()
        assert _image(pipe).shape == ref.shape


def test_docs_snippets_run(made, tmp_path, monkeypatch):
    """Every python block of docs/diffusers.md, on tiny-sd (the placeholder folders replaced)."""
    floating, export, in_memory = made("tiny-sd")
    text = (Path(__file__).resolve().parents[2] / "docs" / "diffusers.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) == 2
    for block in blocks:
        code = block.replace("out/sd-w8a8", str(export)).replace("path/to/float-pipeline", str(floating))
        scope: dict = {}
        exec(compile(code, "docs/diffusers.md", "exec"), scope)
        _assert_same_state(scope["pipe"].unet, in_memory.unet)


@pytest.mark.parametrize("name", MORE)
def test_every_family_loads_and_quantizes_on_load(made, name):
    floating, export, in_memory = made(name)
    attr = json.loads((export / "qdiff.json").read_text())["denoiser"]["attr"]
    pipe = DiffusionPipeline.from_pretrained(export)
    _assert_same_state(_denoiser(pipe), _denoiser(in_memory))
    assert torch.equal(_image(pipe), _image(in_memory))
    quant = PipelineQuantizationConfig(quant_mapping={attr: dm.QdiffConfig(recipe="w8a8")})
    _assert_same_state(
        _denoiser(DiffusionPipeline.from_pretrained(floating, quantization_config=quant)), _denoiser(pipe)
    )


def test_streamed_and_sharded_exports_load(made, tmp_path):
    from qdiff.export.stream import stream_quantize

    floating, _, in_memory = made("tiny-sd")
    streamed = stream_quantize(floating, "w8a8", tmp_path / "s", progress=False, max_shard_bytes=2e5)
    assert len(list((streamed / "unet").glob("qdiff-*-of-*.safetensors"))) > 1
    index = json.loads((streamed / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in (streamed / "unet").glob("qdiff-*.safetensors")}
    _assert_same_state(DiffusionPipeline.from_pretrained(streamed).unet, in_memory.unet)
    denoiser_only = stream_quantize(floating / "unet", "w8a8", tmp_path / "d", progress=False)
    _assert_same_state(type(in_memory.unet).from_pretrained(denoiser_only, subfolder="unet"), in_memory.unet)


def test_static_recipe_with_calibration_folder(made, tmp_path):
    from qdiff.calib.stats import CapturedStats, LayerStats
    from qdiff.models.adapters import get_adapter
    from qdiff.quant.split import part_keys
    from qdiff.quant.transform import layer_specs

    floating, _, _ = made("tiny-sd")
    recipe = Recipe.load("w8a8-static")
    den = load_pipeline(str(floating)).unet
    g, layers = torch.Generator().manual_seed(0), {}
    for i, (name, q) in enumerate(layer_specs(get_adapter(den).layers(den), recipe).items()):
        for key in (name, *part_keys(name)) if q.a_split is not None else (name,):
            st = LayerStats()
            for step in range(2):
                st.update(torch.randn(64, generator=g) * (1 + i % 5), step)
            layers[key] = st
    split = {n: q.a_split for n, q in layer_specs(get_adapter(den).layers(den), recipe).items() if q.a_split}
    ranges = CapturedStats(layers, {"split_layers": split})
    ranges.save(tmp_path / "cal")
    ref = qdiff.quantize(
        load_pipeline(str(floating)), recipe, ranges=CapturedStats.load(tmp_path / "cal"), progress=False
    )
    quant = dm.QdiffConfig(recipe="w8a8-static", calib=str(tmp_path / "cal"))
    pipe = DiffusionPipeline.from_pretrained(
        floating, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": quant})
    )
    _assert_same_state(pipe.unet, ref.unet)


def test_tampered_diffusers_index_refused(made, tmp_path):
    _, export, _ = made("tiny-sd")
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    index = bad / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(index.read_text().replace('"qdiff"', '"qdiff "', 1))
    with pytest.raises(QdiffError, match=r"index.json: sha256 mismatch"):
        DiffusionPipeline.from_pretrained(bad)


def test_qdiff_save_of_diffusers_loaded_pipelines_round_trips(made, tmp_path):
    """The save path diffusers users get: qdiff.save of a pipeline loaded or quantized through diffusers."""
    floating, export, in_memory = made("tiny-sd")
    quant = PipelineQuantizationConfig(quant_mapping={"unet": dm.QdiffConfig(recipe="w8a8")})
    loaded = DiffusionPipeline.from_pretrained(export)
    for i, pipe in enumerate((loaded, DiffusionPipeline.from_pretrained(floating, quantization_config=quant))):
        out = qdiff.save(pipe, tmp_path / f"out{i}")
        config = json.loads((out / "unet" / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "qdiff" and "_pre_quantization_dtype" not in config
        _assert_same_state(DiffusionPipeline.from_pretrained(out).unet, in_memory.unet)
        _assert_same_state(qdiff.load(out).unet, in_memory.unet)


def test_qsched_export_warns_on_the_diffusers_path(made, tmp_path):
    _, export, in_memory = made("tiny-sd")
    marked = tmp_path / "q"
    shutil.copytree(export, marked)
    manifest = json.loads((marked / "qdiff.json").read_text())
    (marked / "qdiff.json").write_text(json.dumps({**manifest, "schedule": {"coefficients": []}}))
    with pytest.warns(UserWarning, match=r"Q-Sched coefficients .* qdiff.load\(path\) draws with them"):
        unet = type(in_memory.unet).from_pretrained(marked, subfolder="unet")
    _assert_same_state(unet, in_memory.unet)


def test_other_torch_dtype_is_refused(made):
    _, export, in_memory = made("tiny-sd")
    with pytest.raises(QdiffError, match=r"float tensors are float32; load it without dtype"):
        DiffusionPipeline.from_pretrained(export, dtype=torch.float16)
    unet = type(in_memory.unet).from_pretrained(export, subfolder="unet", dtype=torch.float32)
    _assert_same_state(unet, in_memory.unet)


def test_one_device_map_is_honoured_a_split_refused(made):
    floating, export, in_memory = made("tiny-sd")
    cls = type(in_memory.unet)
    for device_map in ("cpu", {"": "cpu"}):
        unet = cls.from_pretrained(export, subfolder="unet", device_map=device_map)
        _assert_same_state(unet, in_memory.unet)
    quant = dm.QdiffConfig(recipe="w8a8")
    _assert_same_state(
        cls.from_pretrained(floating, subfolder="unet", quantization_config=quant, device_map="cpu"), unet
    )
    with pytest.raises(QdiffError, match=r"device_map=.* is not supported \(one denoiser on one device\)"):
        cls.from_pretrained(export, subfolder="unet", device_map={"conv_in": "cpu", "down_blocks": "disk"})


def test_eval_table_goes_into_the_card_and_is_rehashed(made, tmp_path):
    from qdiff.export.card import add_eval_table

    _, export, in_memory = made("tiny-sd")
    copy = tmp_path / "e"
    shutil.copytree(export, copy)
    add_eval_table(copy, "| model | CLIP |\n|---|---|\n| w8a8 | 0.31 |\n")
    card = (copy / "README.md").read_text()
    assert "## Evaluation\n\n| model | CLIP |\n|---|---|\n| w8a8 | 0.31 |\n\n## Load it" in card
    _assert_same_state(DiffusionPipeline.from_pretrained(copy).unet, in_memory.unet)  # every hash still checks


def test_main_job_export_loads_the_diffusers_way(tmp_path, capsys):
    """README's main job (qdiff quantize --eval on the bundled Shapes model): its card holds the eval table and
    DiffusionPipeline.from_pretrained loads the export after the one import."""
    from qdiff.cli import main
    from qdiff.models.adapters import find_denoiser

    out = tmp_path / "shapes-w8a8"
    assert main(["quantize", "--out", str(out), "--eval", "--eval-num-prompts", "2", "--no-progress"]) == 0
    assert "| real renders |" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "| real renders |" in card.split("## Evaluation")[1].split("## Load it")[0]
    _assert_same_state(find_denoiser(DiffusionPipeline.from_pretrained(out))[1], find_denoiser(qdiff.load(out))[1])
