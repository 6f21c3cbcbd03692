"""Seeded sampling over prompts: the one place qdiff runs a pipeline's sampler (calibration, sensitivity, Q-Sched,
evaluation and the BOS probe all draw through here).

Prompt ``j`` of a call always gets its own generator seeded with ``seeds[j]``, so images (and latents) do not depend
on the batch size or on how prompts are split across processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from qdiff.config.sections import SamplerConfig
from qdiff.utils.progress import progress_bar


def sampler_kwargs(sampler: SamplerConfig) -> dict:
    """Keyword arguments for ``pipe(...)`` from the recipe's sampler section."""
    kwargs = {"num_inference_steps": sampler.steps, "guidance_scale": sampler.guidance_scale}
    if sampler.height is not None:
        kwargs["height"] = sampler.height
    if sampler.width is not None:
        kwargs["width"] = sampler.width
    return kwargs


def prompt_seeds(sampler: SamplerConfig, count: int, offset: int = 0) -> list[int]:
    """The recipe's default seeds: prompt ``j`` gets ``sampler.seed + offset + j``."""
    return [int(sampler.seed) + offset + j for j in range(count)]


@torch.no_grad()
def draw(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] | None,
    sampler: SamplerConfig,
    batch_size: int,
    *,
    output_type: str = "pt",
    desc: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    keep: bool = True,
) -> Tensor | None:
    """Run the sampler over ``prompts`` in batches; prompt ``j`` uses ``torch.Generator().manual_seed(seeds[j])``
    (``seeds=None``: :func:`prompt_seeds`, the recipe's seed + j).

    Returns images float32 ``(P, 3, H, W)`` in [0, 1] on CPU (``output_type="pt"``) or latents
    (``output_type="latent"``); ``keep=False`` returns None (calibration only needs the forward passes).
    ``desc`` shows a progress bar over batches; ``on_batch(i)`` is called before batch ``i``.
    """
    seeds = prompt_seeds(sampler, len(prompts)) if seeds is None else seeds
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)  # one bar over batches instead of one per call
    out: list[Tensor] = []
    try:
        starts = range(0, len(prompts), batch_size)
        bar = progress_bar(starts, desc=desc or "", unit="batch", enabled=desc is not None)
        for i, start in enumerate(bar):
            if on_batch is not None:
                on_batch(i)
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            batch = list(prompts[start : start + batch_size])
            res = pipe(batch, generator=gens, output_type=output_type, **sampler_kwargs(sampler))
            if keep:
                out.append(res.images.detach().float().cpu())
    finally:
        pipe._progress_bar_config = saved
    return torch.cat(out) if keep else None
