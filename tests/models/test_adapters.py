"""Architecture adapters: layer discovery and grouping on the tiny pipelines and on real configs (meta device)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import collections  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qdiff.errors import QdiffError  # noqa: E402
from qdiff.models.adapters import LayerInfo, find_denoiser, get_adapter, quantizable_modules  # noqa: E402
from qdiff.models.families import FLUX, PIXART, SD3, UNET  # noqa: E402
from qdiff.models.published import (  # noqa: E402
    FLUX_SCHNELL,
    PIXART_1024,
    SD3_MEDIUM,
    SD15_UNET,
    SD21_UNET,
    SDXL_UNET,
)
from qdiff.models.tiny import tiny_pixart_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

TINY_BUILDERS = {"tiny-sd": tiny_sd_pipeline, "tiny-sdxl": tiny_sdxl_pipeline, "tiny-pixart": tiny_pixart_pipeline}

# Published configs (the values of the config.json files on the hub), written out here.


@pytest.fixture(scope="module")
def tiny():
    return {name: build() for name, build in TINY_BUILDERS.items()}


def _meta(cls_name, config):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**config)


def _check_consistent(den, infos):
    names = [i.name for i in infos]
    assert len(names) == len(set(names))
    expected_order = [n for n, m in den.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    assert names == expected_order  # module (registration) order; no grouped convs in these models
    for info in infos:
        assert isinstance(info, LayerInfo)
        mod = den.get_submodule(info.name)
        if info.kind == "linear":
            assert isinstance(mod, nn.Linear)
            assert (info.in_features, info.out_features) == (mod.in_features, mod.out_features)
        else:
            assert info.kind == "conv2d" and isinstance(mod, nn.Conv2d)
            kh, kw = mod.kernel_size
            assert info.in_features == mod.in_channels * kh * kw and info.out_features == mod.out_channels
        assert info.weight_numel == mod.weight.numel() == info.in_features * info.out_features
        assert info.group in ("content", "quality")


def _summary(infos):
    kinds = collections.Counter(i.kind for i in infos)
    groups = collections.Counter(i.group for i in infos)
    return len(infos), kinds["linear"], kinds["conv2d"], groups["content"], [i.name for i in infos if i.protected]


# --- tiny pipelines -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, attr, family, counts",
    [
        # (total, linear, conv2d, content, protected)
        ("tiny-sd", "unet", "unet", (83, 50, 33, 24, ["conv_in", "conv_out"])),
        ("tiny-sdxl", "unet", "unet", (125, 100, 25, 48, ["conv_in", "conv_out"])),
        ("tiny-pixart", "transformer", "pixart", (27, 26, 1, 12, ["pos_embed.proj", "proj_out"])),
    ],
)
def test_tiny_layer_lists(tiny, name, attr, family, counts):
    pipe = tiny[name]
    got_attr, den = find_denoiser(pipe)
    assert got_attr == attr and den is getattr(pipe, attr)
    adapter = get_adapter(den)
    assert adapter.family == family and adapter.denoiser_attr == attr
    infos = adapter.layers(den)
    _check_consistent(den, infos)
    assert _summary(infos) == counts


def test_tiny_sd_groups_by_name(tiny):
    den = tiny["tiny-sd"].unet
    by_name = {i.name: i for i in get_adapter(den).layers(den)}
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    for suffix in ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
        assert by_name[f"{block}.{suffix}"].group == "content"
    for suffix in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"):
        assert by_name[f"{block}.{suffix}"].group == "quality"
    for name in (
        "conv_in",
        "time_embedding.linear_1",
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.0.resnets.0.time_emb_proj",
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.0.resnets.0.conv_shortcut",
        "conv_out",
    ):
        assert by_name[name].group == "quality", name
    assert by_name["down_blocks.0.attentions.0.proj_in"].kind == "conv2d"  # SD1.x: 1x1 conv projections
    assert by_name["conv_in"].protected and by_name["conv_out"].protected
    assert sum(i.protected for i in by_name.values()) == 2


def test_tiny_sdxl_add_embedding_and_linear_proj(tiny):
    den = tiny["tiny-sdxl"].unet
    by_name = {i.name: i for i in get_adapter(den).layers(den)}
    assert by_name["add_embedding.linear_1"].group == "quality"
    assert by_name["add_embedding.linear_1"].in_features == den.config.projection_class_embeddings_input_dim
    assert by_name["down_blocks.1.attentions.0.proj_in"].kind == "linear"
    assert by_name["mid_block.attentions.0.transformer_blocks.1.ff.net.2"].group == "content"


def test_cross_attention_kv(tiny):
    for name, pipe in tiny.items():
        _, den = find_denoiser(pipe)
        adapter = get_adapter(den)
        kv = adapter.cross_attention_kv(den)
        assert kv and len(kv) % 2 == 0, name
        by_name = {i.name: i for i in adapter.layers(den)}
        for layer in kv:
            assert layer.rsplit(".", 2)[-2:] in (["attn2", "to_k"], ["attn2", "to_v"]), layer
            assert by_name[layer].group == "content"
            # these are exactly the layers that consume the text embedding
            assert by_name[layer].in_features == den.config.cross_attention_dim, layer
    assert len(get_adapter(tiny["tiny-sd"].unet).cross_attention_kv(tiny["tiny-sd"].unet)) == 8


def test_pixart_groups(tiny):
    den = tiny["tiny-pixart"].transformer
    by_name = {i.name: i for i in get_adapter(den).layers(den)}
    assert by_name["transformer_blocks.0.attn2.to_k"].group == "content"
    assert by_name["transformer_blocks.1.ff.net.0.proj"].group == "content"
    assert by_name["transformer_blocks.0.attn1.to_q"].group == "quality"
    assert by_name["caption_projection.linear_1"].group == "quality"
    assert by_name["adaln_single.linear"].group == "quality"
    assert by_name["pos_embed.proj"].kind == "conv2d" and by_name["pos_embed.proj"].protected
    assert by_name["proj_out"].protected and not by_name["transformer_blocks.0.attn1.to_out.0"].protected


def test_linear_subclasses_found_and_grouped_convs_skipped(tiny):
    class LoRALikeLinear(nn.Linear):
        pass

    net = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=4),  # depthwise: skipped
        nn.Conv2d(4, 8, 1),
        LoRALikeLinear(8, 8),
        nn.Sequential(nn.Linear(8, 2), nn.Conv1d(2, 2, 1)),
    )
    found = [(n, k) for n, _, k in quantizable_modules(net)]
    assert found == [("1", "conv2d"), ("2", "linear"), ("3.0", "linear")]

    den = TINY_BUILDERS["tiny-sd"]().unet
    old = den.conv_in
    den.conv_in = nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1, groups=4)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    lin = den.get_submodule(layer)
    block = den.get_submodule(layer.rsplit(".", 1)[0])
    block.to_k = LoRALikeLinear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    infos = {i.name: i for i in get_adapter(den).layers(den)}
    assert "conv_in" not in infos
    assert infos[layer].kind == "linear" and infos[layer].group == "content"
    assert layer in get_adapter(den).cross_attention_kv(den)


def test_errors_are_single_line(tiny):
    class NoDenoiser:
        pass

    with pytest.raises(QdiffError, match="unet.*transformer") as err:
        find_denoiser(NoDenoiser())
    assert "\n" not in str(err.value)
    with pytest.raises(QdiffError) as err:
        get_adapter(nn.Linear(2, 2))
    msg = str(err.value)
    assert "\n" not in msg and "Linear" in msg and "unet" in msg and "pixart" in msg


# --- real published configs on the meta device ----------------------------------------------------------


def test_sdxl_real_config_counts():
    den = _meta("UNet2DConditionModel", SDXL_UNET)
    infos = UNET.layers(den)
    _check_consistent(den, infos)
    # MixDQ reports 794 conv/linear layers for the SDXL(-Turbo) UNet; we count the same:
    # 743 Linear (incl. time_embedding, add_embedding, time_emb_proj and linear proj_in/proj_out) + 51 Conv2d.
    assert _summary(infos) == (794, 743, 51, 420, ["conv_in", "conv_out"])
    assert len(UNET.cross_attention_kv(den)) == 2 * 70  # 70 transformer blocks
    assert sum(i.weight_numel for i in infos) == 2_565_880_320


def test_sd15_real_config_counts():
    den = _meta("UNet2DConditionModel", SD15_UNET)
    infos = get_adapter(den).layers(den)
    _check_consistent(den, infos)
    # 16 transformer blocks x 10 linears + 2 time-embedding + 22 time_emb_proj = 184 Linear;
    # 22 resnets x 2 + 14 conv_shortcut + 32 (1x1 proj_in/proj_out) + 6 down/up samplers + conv_in/out = 98 Conv2d.
    assert _summary(infos) == (282, 184, 98, 96, ["conv_in", "conv_out"])
    assert len(get_adapter(den).cross_attention_kv(den)) == 32


def test_pixart_real_config_counts():
    den = _meta("PixArtTransformer2DModel", PIXART_1024)
    adapter = get_adapter(den)
    assert adapter is PIXART
    infos = adapter.layers(den)
    _check_consistent(den, infos)
    # 28 blocks x 10 + caption projection 2 + adaln_single 7 (timestep 2, resolution 2, aspect ratio 2, linear 1)
    # + proj_out = 290 Linear; the patch embedding is the one Conv2d.
    assert _summary(infos) == (291, 290, 1, 168, ["pos_embed.proj", "proj_out"])
    assert len(adapter.cross_attention_kv(den)) == 56


def test_flux_real_config_counts():
    den = _meta("FluxTransformer2DModel", FLUX_SCHNELL)
    adapter = get_adapter(den)
    assert adapter is FLUX and adapter.denoiser_attr == "transformer"
    infos = adapter.layers(den)
    _check_consistent(den, infos)
    # 19 double blocks x 14 + 38 single blocks x 6 + 8 embedders/outputs = 502 Linear, no conv.
    # content: double blocks' attn (8) + ff (2) + ff_context (2); single blocks' attn (3) + proj_mlp + proj_out.
    assert _summary(infos) == (502, 502, 0, 19 * 12 + 38 * 5, ["context_embedder", "x_embedder", "proj_out"])
    by_name = {i.name: i for i in infos}
    assert by_name["transformer_blocks.0.norm1.linear"].group == "quality"
    assert by_name["single_transformer_blocks.0.norm.linear"].group == "quality"
    assert len(adapter.cross_attention_kv(den)) == 2 * 19


def test_sd21_sd_turbo_real_config_counts():
    den = _meta("UNet2DConditionModel", SD21_UNET)
    infos = get_adapter(den).layers(den)
    _check_consistent(den, infos)
    # The SD1.5 layer list with linear proj_in/proj_out: the 32 1x1 convs of SD1.5 become Linear,
    # 184 + 32 = 216 Linear, 98 - 32 = 66 Conv2d, 282 in all; the cross-attention K/V read 1024-wide OpenCLIP-H.
    assert _summary(infos) == (282, 216, 66, 96, ["conv_in", "conv_out"])
    kv = get_adapter(den).cross_attention_kv(den)
    assert len(kv) == 32 and {den.get_submodule(n).in_features for n in kv} == {1024}


def test_lcm_dreamshaper_real_config_counts():
    # SimianLuo/LCM_Dreamshaper_v7: the SD1.5 UNet plus time_cond_proj_dim=256 (the guidance-scale embedding adds
    # one Linear, time_embedding.cond_proj): 282 + 1 = 283.
    den = _meta("UNet2DConditionModel", {**SD15_UNET, "time_cond_proj_dim": 256})
    infos = get_adapter(den).layers(den)
    _check_consistent(den, infos)
    assert _summary(infos) == (283, 185, 98, 96, ["conv_in", "conv_out"])
    assert {i.name: i for i in infos}["time_embedding.cond_proj"].in_features == 256


def test_sd3_medium_real_config_counts():
    den = _meta("SD3Transformer2DModel", SD3_MEDIUM)
    adapter = get_adapter(den)
    assert adapter is SD3 and adapter.family == "sd3"
    infos = adapter.layers(den)
    _check_consistent(den, infos)
    # 24 joint blocks: 23 x 14 Linear (norm1, norm1_context, to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out,
    # ff x2, ff_context x2) + the last block (context_pre_only: no to_add_out, no ff_context) with 11 = 333;
    # + time_text_embed 4 + context_embedder + norm_out.linear + proj_out = 340 Linear; pos_embed.proj is the Conv2d.
    # Content: 23 x (3 add_* + to_add_out + 2 ff + 2 ff_context) + (3 add_* + 2 ff) = 189.
    assert _summary(infos) == (341, 340, 1, 189, ["pos_embed.proj", "context_embedder", "proj_out"])
    by_name = {i.name: i for i in infos}
    assert by_name["transformer_blocks.0.attn.to_q"].group == "quality"
    assert by_name["transformer_blocks.0.attn.add_q_proj"].group == "content"
    assert by_name["transformer_blocks.0.norm1_context.linear"].group == "quality"
    kv = adapter.cross_attention_kv(den)
    assert len(kv) == 2 * 24 and {by_name[n].in_features for n in kv} == {1536}  # the caption projection width


def test_tiny_family_builtins_match_real_layer_names():
    """Each tiny family instance has only layer names of the real architecture (the real config with the tiny
    one's block pattern), with the same module types."""
    from qdiff.export.resolve import load_pipeline

    pairs = {
        "tiny-sd-turbo": ("UNet2DConditionModel", SD21_UNET),
        "tiny-lcm-dreamshaper": ("UNet2DConditionModel", {**SD15_UNET, "time_cond_proj_dim": 256}),
        "tiny-sdxl-turbo": ("UNet2DConditionModel", SDXL_UNET),
        "tiny-pcm-sdxl": ("UNet2DConditionModel", SDXL_UNET),
        "tiny-pixart-lcm": ("PixArtTransformer2DModel", PIXART_1024),
        "tiny-flux-schnell": ("FluxTransformer2DModel", FLUX_SCHNELL),
        "tiny-sd3": ("SD3Transformer2DModel", SD3_MEDIUM),
    }
    for builtin, (cls, config) in pairs.items():
        _, tiny_den = find_denoiser(load_pipeline(f"builtin:{builtin}"))
        real = _meta(cls, config)
        real_kinds = {i.name: (i.kind, i.group, i.protected) for i in get_adapter(real).layers(real)}
        tiny_infos = get_adapter(tiny_den).layers(tiny_den)
        assert type(tiny_den).__name__ == cls
        for info in tiny_infos:
            assert real_kinds.get(info.name) == (info.kind, info.group, info.protected), (builtin, info.name)
