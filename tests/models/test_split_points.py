"""The UNet architecture's split points (``qdiff.models.splits.unet_skip_splits``): the split of every up-block
``cat([up, skip])`` input, checked against the tensors.

Forward pre-hooks record, for each up block, the skip tensors it pops (``res_hidden_states_tuple``) and, for each
of its resnets, the concatenated input; the skip tensor must be exactly the input's channels from the split on.
"""

from __future__ import annotations

import pytest
import torch

from qdiff.models.adapters import get_adapter
from qdiff.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


def _hooked_splits(unet, run) -> dict[str, int]:
    """Resnet name -> up-path channels, measured: the popped skip tensor equals the tail of the resnet input."""
    skips: dict[int, tuple] = {}
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(unet.up_blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, _a, kw, i=i: skips.__setitem__(i, kw["res_hidden_states_tuple"]), with_kwargs=True
            )
        )
        for j, resnet in enumerate(block.resnets):
            handles.append(resnet.register_forward_pre_hook(lambda _m, a, i=i, j=j: inputs.__setitem__((i, j), a[0])))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for (i, j), x in inputs.items():
        skip = skips[i][-(j + 1)]  # the block pops its skip tuple from the end, one per resnet
        split = x.shape[1] - skip.shape[1]
        assert torch.equal(x[:, split:], skip), (i, j)  # the tail really is the skip tensor
        out[f"up_blocks.{i}.resnets.{j}"] = split
    assert len(out) == sum(len(b.resnets) for b in unet.up_blocks)
    return out


def _check(unet, run) -> dict[str, int]:
    measured = _hooked_splits(unet, run)
    reported = get_adapter(unet).act_splits(unet)
    expected = {}
    for prefix, split in measured.items():
        for leaf in ("conv1", "conv_shortcut"):
            if hasattr(unet.get_submodule(prefix), leaf) and unet.get_submodule(f"{prefix}.{leaf}") is not None:
                expected[f"{prefix}.{leaf}"] = split
    assert reported == expected
    by_layer = {i.name: i.a_split for i in get_adapter(unet).layers(unet) if i.a_split is not None}
    assert by_layer == expected
    return measured


@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_tiny_sd_and_sdxl_splits_match_the_hooked_tensors(builder):
    pipe = builder(seed=0)
    gen = torch.Generator("cpu").manual_seed(0)
    measured = _check(pipe.unet, lambda: pipe("a cat", num_inference_steps=1, generator=gen, output_type="latent"))
    assert len(set(measured.values())) > 1  # the splits differ between resnets


def test_three_level_unet_with_uneven_blocks():
    """Distinct widths and layers per block, so a split taken from the wrong block or resnet cannot pass."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 24, 40),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=(1, 2, 3),
            norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        ).eval()  # fmt: skip
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor(10), torch.randn(1, 3, 16)
    with torch.no_grad():
        measured = _check(unet, lambda: unet(x, t, encoder_hidden_states=ctx))
    assert len(set(measured.values())) >= 3
