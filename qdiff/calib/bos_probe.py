"""BOS probe (MixDQ, arXiv 2405.17873, Sec. 4.1): is token 0 of the cross-attention K/V input prompt-independent?

:func:`probe_bos` runs one sampling step per probe prompt and compares token 0 of every cross-attention K/V
input; :class:`~qdiff.quant.bos.BOSQuantLinear` then caches the BOS row (invariant) or keeps the float weight
(per call). :func:`plant_bos_outlier` scales token 0 of a text encoder's output, for measuring BOS-aware
quantization on models whose encoder has no outlier (the sensitivity report and the tests use it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qdiff.sampling.draw import sampler_kwargs


@dataclass(frozen=True)
class BOSProbe:
    """Result of :func:`probe_bos`: whether token 0 is prompt-independent, and its embedding per layer."""

    invariant: bool
    max_rel_dev: float  # max |e_0(prompt) - e_0(first)| / max |e_0(first)| over layers, prompts and batch rows
    embeddings: Mapping[str, Tensor]  # layer -> (K,) token-0 input seen first

    @property
    def mode(self) -> str:
        return "cached" if self.invariant else "per_call"


@torch.no_grad()
def probe_bos(pipe, layers: Mapping[str, nn.Module], prompts: Sequence[str], sampler, rtol: float = 1e-4) -> BOSProbe:
    """Run one sampling step per prompt batch and compare token 0 of every cross-attention K/V input.

    ``prompts`` should differ in content and length; the recipe's guidance scale is used, so the
    unconditional branch (which may not start with BOS, e.g. SDXL's zeroed negative prompt) is checked too.
    """
    rows: dict[str, list[Tensor]] = {name: [] for name in layers}

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0]
            if x.dim() == 3:
                rows[name].append(x[:, 0].detach().float().cpu())

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    kwargs = {**sampler_kwargs(sampler), "num_inference_steps": 1}
    try:
        for i, prompt in enumerate(prompts):
            gen = torch.Generator("cpu").manual_seed(int(sampler.seed) + i)
            pipe([prompt], generator=gen, output_type="latent", **kwargs)
    finally:
        for h in handles:
            h.remove()
    worst, embeddings = 0.0, {}
    for name, seen in rows.items():
        if not seen:
            raise RuntimeError(f"cross-attention layer {name!r} was not called during the BOS probe")
        allrows = torch.cat(seen)  # (calls * B, K)
        ref = allrows[0]
        scale = float(ref.abs().max()) or 1.0
        worst = max(worst, float((allrows - ref).abs().max()) / scale)
        embeddings[name] = ref
    return BOSProbe(invariant=worst <= rtol, max_rel_dev=worst, embeddings=embeddings)


def plant_bos_outlier(text_encoder: nn.Module, factor: float = 50.0):
    """Test fixture: scale token 0 of the text encoder's output by ``factor`` (real CLIP: ~800 vs ~10-15).

    Returns the hook handle; ``handle.remove()`` undoes it. Hidden states (SDXL uses the penultimate
    layer) are scaled too.
    """

    def hook(_module, _args, out):
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None and isinstance(out, tuple):
            hidden = out[0]
        hidden[:, 0] *= factor
        for h in getattr(out, "hidden_states", None) or ():
            if h is not hidden:
                h[:, 0] *= factor
        return out

    return text_encoder.register_forward_hook(hook)


def kv_layers(denoiser: nn.Module, adapter, names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Cross-attention K/V Linear layers of the denoiser (restricted to ``names`` when given)."""
    kv = adapter.cross_attention_kv(denoiser)
    keep = set(kv) if names is None else set(kv) & set(names)
    mods = {n: denoiser.get_submodule(n) for n in kv if n in keep}
    return {n: m for n, m in mods.items() if isinstance(m, nn.Linear)}


def probe_prompts(prompts: Sequence[str]) -> list[str]:
    """Probe prompts differing in content and length: the empty prompt, the first and the longest one."""
    chosen = ["", prompts[0], max(prompts, key=len)]
    return list(dict.fromkeys(chosen))
