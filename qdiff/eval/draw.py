"""Draw images with a pipeline: one image per prompt, each with its own seeded generator (batch-size independent)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qdiff.calib.capture import sampler_kwargs
from qdiff.recipe import SamplerConfig


@torch.no_grad()
def draw_images(pipe, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig, batch_size: int,
                desc: str | None = None) -> Tensor:  # fmt: skip
    """Images float32 (P, 3, H, W) in [0, 1] on CPU; prompt ``i`` uses ``torch.Generator().manual_seed(seeds[i])``.

    ``desc``: show a progress bar over the batches with this label.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        out = []
        starts = range(0, len(prompts), batch_size)
        for i in tqdm(starts, desc=desc, disable=desc is None, leave=False, unit="batch"):
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
            kwargs = sampler_kwargs(sampler)
            out.append(pipe(list(prompts[i : i + batch_size]), generator=gens, output_type="pt", **kwargs).images)
    finally:
        pipe._progress_bar_config = saved
    return torch.cat(out).float().cpu()
