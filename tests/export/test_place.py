"""One compute dtype per CPU run (qdiff.export.resolve.place) and fp32 quantization scales under .to(dtype)."""

from __future__ import annotations

import torch
from torch import nn

from qdiff.config.dtypes import cpu_compute_dtype
from qdiff.config.layer import LayerQuant
from qdiff.export.resolve import load_pipeline, place
from qdiff.models.tiny import tiny_sdxl_pipeline
from qdiff.quant.modules import quant_module_for

BF16_CPU = frozenset({"avx512f", "avx512_bf16"})
OLD_CPU = frozenset({"avx2"})


def test_cpu_compute_dtype_rules():
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    assert cpu_compute_dtype({f32}, None, BF16_CPU) == f32  # float32 pipelines stay float32
    assert cpu_compute_dtype({f16, f32}, None, BF16_CPU) == bf16  # half on CPU: bf16 where native
    assert cpu_compute_dtype({f16}, None, OLD_CPU) == f32  # ... else float32
    assert cpu_compute_dtype({bf16}, None, OLD_CPU) == bf16  # one dtype already: kept
    assert cpu_compute_dtype({f16}, "float32", BF16_CPU) == f32  # a request wins


def test_float16_folder_runs_on_cpu_in_one_dtype(tmp_path):
    pipe = tiny_sdxl_pipeline(0).to(dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "sdxl16", safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "sdxl16"))
    dtype = place(loaded, "cpu")
    assert dtype in (torch.bfloat16, torch.float32)
    floats = {
        p.dtype
        for m in loaded.components.values()
        if isinstance(m, nn.Module)
        for p in m.parameters()
        if p.is_floating_point()
    }
    assert floats == {dtype}
    gen = torch.Generator("cpu").manual_seed(0)
    images = loaded("a cat", num_inference_steps=1, guidance_scale=0.0, generator=gen, output_type="pt").images
    assert images.shape[1] == 3 and torch.isfinite(images).all()


def test_scales_stay_float32_and_outputs_match_under_bf16():
    layer = nn.Linear(64, 16)
    q = quant_module_for(layer, LayerQuant(w_bits=4, granularity="group", group_size=32, a_mode="static"))
    q.set_act_qparams(torch.tensor(0.05), torch.tensor(-3))
    q.freeze()
    x = torch.randn(5, 64).to(torch.bfloat16)
    reference = q(x.float())  # fp32 layer, the same (bf16-representable) input
    w_scale, a_scale = q.w_scale.clone(), q.a_scale.clone()
    q.to(torch.bfloat16)
    assert q.w_scale.dtype == torch.float32 and q.a_scale.dtype == torch.float32
    assert torch.equal(q.w_scale, w_scale) and torch.equal(q.a_scale, a_scale)
    assert q.qweight.dtype == torch.uint8 and q.bias.dtype == torch.bfloat16
    out = q(x)
    assert out.dtype == torch.bfloat16
    # same integer GEMM and fp32 epilogue; only the bias (now bf16) and the final cast differ
    bias_delta = (layer.bias.detach() - layer.bias.detach().to(torch.bfloat16).float()).abs().max()
    assert (out.float() - reference).abs().max() <= bias_delta + reference.abs().max() * 2**-8


def test_place_casts_qdiff_quantized_modules_but_not_foreign_ones():
    """A qdiff denoiser's config carries ``quantization_config`` (quant_method "qdiff", for the diffusers backend):
    its float parts follow the compute dtype; a module quantized by another library keeps its own dtypes."""
    from types import SimpleNamespace

    from qdiff.integrations.diffusers import QdiffConfig

    def module(quantization_config) -> nn.Module:
        m = nn.Linear(4, 4).to(torch.float16)
        m.config = SimpleNamespace(quantization_config=quantization_config)
        return m

    parts = {
        "qdiff_dict": module({"quant_method": "qdiff", "format_version": 2, "recipe": "w8a8"}),
        "qdiff_object": module(QdiffConfig(recipe="w8a8")),
        "plain": module(None),
        "bnb": module({"quant_method": "bitsandbytes", "load_in_4bit": True}),
    }
    assert place(SimpleNamespace(components=parts), "cpu", "float32") == torch.float32
    assert {name: m.weight.dtype for name, m in parts.items()} == {
        "qdiff_dict": torch.float32, "qdiff_object": torch.float32, "plain": torch.float32, "bnb": torch.float16,
    }  # fmt: skip
