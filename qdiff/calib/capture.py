"""Run the few-step sampler over prompts while observers record layer-input statistics.

Observers are attached for the duration of a ``with`` block and always removed on exit, also when
the sampler raises. Only statistics are kept, never raw activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from qdiff.quant.modules import QuantLayer
from qdiff.quant.observers import Observer
from qdiff.recipe import SamplerConfig


@contextmanager
def observing(layers: Mapping[str, QuantLayer], make: Callable[[str], Observer]) -> Iterator[dict[str, Observer]]:
    """Attach a fresh observer from ``make(name)`` to each layer; detach them all on exit."""
    observers = {name: make(name) for name in layers}
    try:
        for name, layer in layers.items():
            layer.observer = observers[name]
        yield observers
    finally:
        for layer in layers.values():
            layer.observer = None


def sampler_kwargs(sampler: SamplerConfig) -> dict:
    """Keyword arguments for ``pipe(...)`` from the recipe's sampler section."""
    kwargs = {"num_inference_steps": sampler.steps, "guidance_scale": sampler.guidance_scale}
    if sampler.height is not None:
        kwargs["height"] = sampler.height
    if sampler.width is not None:
        kwargs["width"] = sampler.width
    return kwargs


@torch.no_grad()
def run_sampler(
    pipe,
    prompts: Sequence[str],
    sampler: SamplerConfig,
    batch_size: int,
    progress: bool = True,
    desc: str = "sampling",
) -> None:
    """Run the sampler over ``prompts`` in batches (latents only: the VAE decode is skipped)."""
    batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)  # one bar over batches instead of one per call
    try:
        for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
            generator = torch.Generator("cpu").manual_seed(sampler.seed + i)
            pipe(batch, generator=generator, output_type="latent", **sampler_kwargs(sampler))
    finally:
        pipe._progress_bar_config = saved
