"""Split points: layers whose input is a channel concatenation of two differently ranged tensors.

An architecture declares a split rule (``Architecture.splits``): a function ``denoiser -> {layer name: split}``
where ``split`` is the input channel at which the second part starts. Static activation quantizers then get one
range per part (Q-Diffusion's shortcut splitting, ``LayerQuant.a_split``).
"""

from __future__ import annotations

from torch import nn

# Up-block types whose resnets see cat([hidden_states, res_hidden_states]) (diffusers unet_2d_blocks.py).
CONCAT_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D",
                    "SimpleCrossAttnUpBlock2D")  # fmt: skip


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def unet_skip_splits(denoiser: nn.Module) -> dict[str, int]:
    """``up_blocks.{i}.resnets.{j}.conv1`` / ``.conv_shortcut`` -> up-path channels of ``cat([up, skip])``.

    Derived from the config as UNet2DConditionModel builds its up blocks: block ``i`` has
    ``prev_output_channel`` (the previous block's output), ``output_channel`` and ``input_channel`` (the
    next-shallower width); resnet ``j`` of ``n`` takes ``prev_output_channel`` (j = 0) or ``output_channel``
    from the up path and a skip of ``input_channel`` (j = n - 1) or ``output_channel`` channels. A layer whose
    ``in_channels`` disagrees with that sum is left unsplit.
    """
    cfg = denoiser.config
    widths = list(cfg.block_out_channels)[::-1]
    per_block = cfg.layers_per_block
    per_block = [per_block] * len(widths) if isinstance(per_block, int) else list(per_block)[::-1]
    out: dict[str, int] = {}
    output_channel = widths[0]
    for i, block_type in enumerate(cfg.up_block_types):
        prev_output_channel, output_channel = output_channel, widths[i]
        input_channel = widths[min(i + 1, len(widths) - 1)]
        if block_type.removeprefix("UNetRes") not in CONCAT_UP_BLOCKS:
            continue
        n = per_block[i] + 1
        for j in range(n):
            up = prev_output_channel if j == 0 else output_channel
            skip = input_channel if j == n - 1 else output_channel
            for leaf in ("conv1", "conv_shortcut"):
                name = f"up_blocks.{i}.resnets.{j}.{leaf}"
                mod = _submodule(denoiser, name)
                if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.in_channels == up + skip:
                    out[name] = up
    return out
