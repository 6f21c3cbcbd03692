"""qdiff as a diffusers quantization backend: exports load with from_pretrained, quantize on load, card, errors."""

from __future__ import annotations

import json
import re
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


def test_recipe_with_loras_is_refused_on_load(made, tmp_path):
    """Quantize-on-load does not fuse a recipe's LoRAs: refused before any work (the LoRA file is not even opened)."""
    from qdiff.config.loras import LoraFile
    from qdiff.integrations.onload import quantize_denoiser

    floating, _, _ = made("tiny-sd")
    recipe = tmp_path / "w8a8-lora.yaml"  # dynamic activations: everything else quantizes on load
    Recipe.load("w8a8").replace(name="w8a8-lora", loras=(LoraFile("absent.safetensors", 0.8),)).save(recipe)
    pcm = Recipe.load("pcm-sdxl-w8a8").loras[0].path

    def said(name: str, lora: str) -> str:
        return (rf"QdiffConfig\(recipe='{re.escape(name)}'\): the recipe fuses LoRAs \(loras: {re.escape(lora)}\); "
                rf"quantize-on-load does not fuse them: run `qdiff quantize --recipe {re.escape(name)}`")  # fmt: skip

    for name, lora in ((str(recipe), "absent.safetensors"), ("pcm-sdxl-w8a8", pcm)):
        quant = PipelineQuantizationConfig(quant_mapping={"unet": dm.QdiffConfig(recipe=name)})
        with pytest.raises(QdiffError, match=said(name, lora)) as info:
            DiffusionPipeline.from_pretrained(floating, quantization_config=quant)
        assert "\n" not in str(info.value) and "qdiff.quantize(pipe, recipe)" in str(info.value)
    den = torch.nn.Sequential(torch.nn.Linear(4, 4))  # also when diffusers skips validate_environment (no torch_dtype)
    with pytest.raises(QdiffError, match=said(str(recipe), "absent.safetensors")):
        quantize_denoiser(den, dm.QdiffConfig(recipe=str(recipe)))
    assert type(den[0]) is torch.nn.Linear


def _files(folder: Path) -> dict[str, str]:
    return json.loads((folder / "qdiff.json").read_text())["files"]


@pytest.mark.parametrize("name", list(FAMILIES) + MORE)
def test_save_pretrained_writes_the_qdiff_export(made, name, tmp_path):
    """pipe.save_pretrained of a qdiff.quantize pipeline writes the very files qdiff.save writes (every sha256
    equal); it loads both ways and draws the in-memory pipeline's image."""
    _, _, in_memory = made(name)
    out = tmp_path / "saved"
    in_memory.save_pretrained(out)
    assert _files(out) == _files(qdiff.save(in_memory, tmp_path / "ref"))  # tokenizer.json changes once it ran
    attr = json.loads((out / "qdiff.json").read_text())["denoiser"]["attr"]
    assert not (out / attr / "diffusion_pytorch_model.safetensors").exists()
    ref = _image(in_memory)
    for pipe in (qdiff.load(out), DiffusionPipeline.from_pretrained(out)):
        _assert_same_state(_denoiser(pipe), _denoiser(in_memory))
        assert torch.equal(_image(pipe), ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_pretrained_of_loaded_pipelines_round_trips(made, name, tmp_path):
    """Loaded by qdiff.load, by diffusers from an export, quantized on load: save_pretrained -> both loaders."""
    floating, export, in_memory = made(name)
    attr = FAMILIES[name]
    quant = PipelineQuantizationConfig(quant_mapping={attr: dm.QdiffConfig(recipe="w8a8")})
    sources = {
        "qdiff.load": qdiff.load(export),
        "from_pretrained": DiffusionPipeline.from_pretrained(export),
        "on-load": DiffusionPipeline.from_pretrained(floating, quantization_config=quant),
    }
    ref = _image(in_memory)
    for how, pipe in sources.items():
        out = tmp_path / how
        pipe.save_pretrained(out)
        assert not list(out.rglob("*.bin")) and not (out / attr / "diffusion_pytorch_model.safetensors").exists()
        for again in (qdiff.load(out), DiffusionPipeline.from_pretrained(out)):
            _assert_same_state(getattr(again, attr), getattr(in_memory, attr))
            assert torch.equal(_image(again), ref), how
    again, first = _files(tmp_path / "qdiff.load"), _files(export)  # configs name the folder they were loaded from
    assert {k: v for k, v in again.items() if k.startswith(f"{attr}/")} == {
        k: v for k, v in first.items() if k.startswith(f"{attr}/")
    }


def test_save_pretrained_replaces_an_earlier_save_and_keeps_text_encoders(made, tmp_path):
    """Saving twice into one folder (a smaller second export: no stale file survives); a W8A8 CLIP text encoder is
    written by the export (diffusers' own save of it would not load)."""
    from qdiff.export.resolve import load_pipeline as lp

    _, export, in_memory = made("tiny-sd")
    out = tmp_path / "o"
    in_memory.save_pretrained(out)
    recipe = Recipe.load("w8a8")
    recipe = recipe.replace(text_encoders=type(recipe.text_encoders)(clip="w8a8"))
    te = qdiff.quantize(lp("builtin:tiny-sd"), recipe, progress=False)
    te.save_pretrained(out)
    loaded = qdiff.load(out)
    _assert_same_state(loaded.text_encoder, te.text_encoder)
    _assert_same_state(loaded.unet, te.unet)
    assert torch.equal(_image(loaded), _image(te))
    with pytest.raises(QdiffError, match=r"W8A8 CLIPTextModel is saved with its pipeline"):
        te.text_encoder.save_pretrained(tmp_path / "te")


def test_save_pretrained_refusals_name_qdiff_save(made, tmp_path):
    _, export, in_memory = made("tiny-sd")
    loaded = DiffusionPipeline.from_pretrained(export)
    for unet in (in_memory.unet, loaded.unet):  # the denoiser alone: no manifest of the pipeline
        with pytest.raises(QdiffError, match=r"saved with its pipeline \(pipe.save_pretrained\(DIR\) or qdiff.save"):
            unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(QdiffError, match=r"variant='fp16' is not supported .* qdiff.save\(pipe, DIR\)"):
        loaded.save_pretrained(tmp_path / "v", variant="fp16")
    with pytest.raises(QdiffError, match=r"safe_serialization=False"):
        in_memory.save_pretrained(tmp_path / "p", safe_serialization=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(QdiffError, match=r"notes.txt: not part of the pipeline"):
        in_memory.save_pretrained(busy)
    assert (busy / "notes.txt").read_text() == "mine" and not (busy / "qdiff.json").exists()
    from diffusers import ModelMixin

    with pytest.raises(QdiffError, match=r"ModelMixin.save_pretrained cannot .* qdiff.save\(pipe, DIR\)"):
        ModelMixin.save_pretrained(loaded.unet, tmp_path / "direct")


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
    assert len(blocks) == 3
    scope: dict = {}
    for block in blocks:
        code = block.replace("out/sd-w8a8", str(export)).replace("path/to/float-pipeline", str(floating))
        code = code.replace("out/my-copy", str(tmp_path / "copy"))
        exec(compile(code, "docs/diffusers.md", "exec"), scope)
        _assert_same_state(scope["pipe"].unet, in_memory.unet)
    _assert_same_state(qdiff.load(tmp_path / "copy").unet, in_memory.unet)


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
