"""Quantization-relevant properties of a Shapes pipeline: per-layer activation ranges and BOS-token outliers.

``python -m qdiff.models.shapes.analysis [--weights DIR | --run runs/shapes] [--out report.json]`` samples
held-out prompts with the default 4-step sampler and records, for every ``nn.Linear`` / ``nn.Conv2d`` of the
UNet and the text encoder, the absolute max and the 99.9th percentile of |input| (sampled) over all calls,
plus the text encoder's output norm at BOS vs word tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from . import data


@torch.no_grad()
def activation_ranges(
    pipe, prompts: list[str], seed: int = 0, steps: int = 4, guidance: float = 3.0, sample: int = 4096
) -> dict[str, dict[str, float]]:
    """Per-layer input statistics {name: {absmax, p999, mean_abs}} for UNet ('unet.*') and text encoder ('te.*')."""
    stats: dict[str, dict[str, float]] = {}
    hooks = []

    def hook(name: str):
        def fn(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inp[0].detach().float().abs().flatten()
            idx = torch.linspace(0, x.numel() - 1, min(sample, x.numel())).long()
            q = float(torch.quantile(x[idx], 0.999))
            s = stats.setdefault(name, {"absmax": 0.0, "p999": 0.0, "mean_abs": 0.0, "calls": 0})
            s["absmax"] = max(s["absmax"], float(x.max()))
            s["p999"] = max(s["p999"], q)
            s["mean_abs"] += float(x.mean())
            s["calls"] += 1

        return fn

    for prefix, model in (("unet", pipe.unet), ("te", pipe.text_encoder)):
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                hooks.append(m.register_forward_hook(hook(f"{prefix}.{name}")))
    try:
        g = torch.Generator().manual_seed(seed)
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt")
    finally:
        for h in hooks:
            h.remove()
    for s in stats.values():
        s["mean_abs"] /= max(1, s["calls"])
    return stats


def bos_outlier(pipe, prompts: list[str]) -> dict[str, float]:
    """Text-encoder output L2 norms: BOS (position 0) vs word tokens vs EOS/padding."""
    from .train_unet import token_norms

    return token_norms(pipe.text_encoder, pipe.tokenizer, prompts)


@torch.no_grad()
def full_eval(
    pipe,
    weights_dir: Path | None,
    n: int = 256,
    seed: int = 7000,
    steps: int = 4,
    guidance: float = 3.0,
    batch: int = 64,
) -> dict[str, float]:
    """Held-out prompts, fixed seeds: attribute accuracy, Shapes-FID (classifier features vs real renders of the
    same prompts), CLIP score (true vs shuffled captions) and quality score; real-render references alongside."""
    import numpy as np

    from .scorers import AttributeClassifier, ClipScorer, QualityScorer, frechet_distance

    prompts = data.eval_prompts(n, seed)
    caps = [c for c, _ in prompts]
    imgs = []
    for i in range(0, n, batch):
        g = torch.Generator().manual_seed(seed + i)
        imgs.append(
            pipe(
                caps[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt"
            ).images
        )
    gen = torch.cat(imgs)
    rng = np.random.default_rng(seed + 1)
    real = np.stack([data.render(a, rng) for _, a in prompts])
    real2 = np.stack([data.render(a, rng) for _, a in prompts])
    clf, clip, qual = AttributeClassifier(weights_dir), ClipScorer(weights_dir), QualityScorer(weights_dir)
    res = {f"acc_{k}": v for k, v in clf.accuracy(gen, torch.tensor([a.as_tuple() for _, a in prompts])).items()}
    fr = clf.features(real)
    res["shapes_fid"] = frechet_distance(clf.features(gen), fr)
    res["shapes_fid_real_vs_real"] = frechet_distance(clf.features(real2), fr)
    shuffled = caps[1:] + caps[:1]
    st = clip.score(gen, caps)
    res["clip_score"] = float(st.mean())
    res["clip_true_above_shuffled"] = float((st > clip.score(gen, shuffled)).float().mean())
    res["clip_score_real"] = float(clip.score(real, caps).mean())
    res["quality"] = float(qual.score(gen).mean())
    res["quality_real"] = float(qual.score(real).mean())
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=None, help="exported weights folder (default: the package)")
    p.add_argument("--n", type=int, default=32, help="number of held-out prompts")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--eval", type=int, default=0, help="also run full_eval on this many held-out prompts")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args(argv)
    from .pipeline import shapes_pipeline

    pipe = shapes_pipeline(args.weights)
    prompts = [c for c, _ in data.eval_prompts(args.n, seed=4321)]
    ranges = activation_ranges(pipe, prompts)
    top = sorted(ranges.items(), key=lambda kv: -kv[1]["absmax"])[:15]
    report = {"bos": bos_outlier(pipe, prompts), "layers": ranges}
    print(json.dumps(report["bos"], indent=2))
    for name, s in top:
        print(f"{name:70s} absmax {s['absmax']:9.2f}  p99.9 {s['p999']:8.2f}  mean|x| {s['mean_abs']:.3f}")
    if args.eval:
        report["eval"] = full_eval(pipe, args.weights, args.eval, steps=args.steps, guidance=args.guidance)
        print(json.dumps(report["eval"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
