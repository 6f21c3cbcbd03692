"""Train the Shapes model from scratch: ``python -m qdiff.models.shapes.train [--stage all|...] [--out runs/shapes]``.

Stages (each resumes from its last checkpoint in ``<out>/<stage>/``; run ``all`` for the order below):
classifier -> vae -> unet (+ text encoder) -> clip -> quality -> export (writes the shipped weights folder).
All data are fresh seeded renders (:mod:`qdiff.models.shapes.data`); images are (B, 3, 64, 64) in [-1, 1].
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data
from .checkpoint import Logger, atomic_save_json, load_checkpoint, save_checkpoint, setup
from .models import QUALITY_CONFIG, VAE_CONFIG, AttributeNet, count_params
from .scorers import AttributeClassifier, load_net

STAGES = ("classifier", "vae", "unet", "clip", "quality", "export")


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-image sigma (B,) on (B, C, H, W) (separable, 9 taps, reflect padding)."""
    r = torch.arange(-4, 5, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 9)
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (4, 4, 4, 4), mode="reflect")
    kk = k.repeat_interleave(c, 0)
    y = F.conv2d(y, kk[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Randomly blur / add noise / shift colours / pixelate / reduce contrast, one degradation per image."""
    b = x.shape[0]
    kind = torch.randint(0, 5, (b,), generator=g)
    u = torch.rand(b, generator=g) * strength
    out = x.clone()
    m = kind == 0
    if m.any():
        out[m] = blur(x[m], 0.6 + 1.6 * u[m])
    m = kind == 1
    if m.any():
        out[m] = x[m] + (0.04 + 0.3 * u[m])[:, None, None, None] * torch.randn(x[m].shape, generator=g)
    m = kind == 2
    if m.any():
        shift = torch.randn(int(m.sum()), 3, 1, 1, generator=g)
        out[m] = x[m] + (0.1 + 0.4 * u[m])[:, None, None, None] * shift / shift.norm(dim=1, keepdim=True)
    m = kind == 3
    if m.any():
        f = 2 if strength < 1 else int(2 ** torch.randint(1, 3, (1,), generator=g))  # pixelate by 2 or 4
        out[m] = F.interpolate(F.avg_pool2d(x[m], f), scale_factor=f, mode="nearest")
    m = kind == 4
    if m.any():
        out[m] = x[m] * (0.85 - 0.5 * u[m])[:, None, None, None]
    return out.clamp(-1, 1)


def _cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_net(
    name: str,
    net: AttributeNet,
    out: Path,
    steps: int,
    bs: int,
    lr: float,
    seed: int,
    resume: bool,
    batch_fn,
    loss_fn,
    log: Logger,
) -> None:
    """Generic loop with checkpoints every 100 steps; ``batch_fn(step) -> (x, y)``, ``loss_fn(net, x, y)``."""
    ckpt = out / "ckpt.safetensors"
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start = 0
    if resume and ckpt.exists():
        start = load_checkpoint(ckpt, {"net": net}, opt)["step"]
        log(f"{name}: resumed at step {start}")
    net.train()
    for step in tqdm(range(start, steps), desc=name, initial=start, total=steps):
        for gr in opt.param_groups:
            gr["lr"] = _cosine_lr(step, steps, lr)
        x, y = batch_fn(step)
        loss = loss_fn(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(f"{name} step {step} loss {loss.item():.4f}")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            save_checkpoint(ckpt, {"net": net}, opt, {"step": step + 1, "seed": seed})
    net.eval()


def export_net(net: AttributeNet, stem: Path) -> None:
    """Write ``stem.safetensors`` + ``stem.json`` (the format :func:`scorers.load_net` reads)."""
    from .checkpoint import atomic_save_tensors

    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(dict(net.state_dict()), stem.with_suffix(".safetensors"))
    atomic_save_json(net.config, stem.with_suffix(".json"))


def stage_classifier(root: Path, args: argparse.Namespace) -> None:
    out = root / "classifier"
    log = Logger(out)
    if (out / "classifier.safetensors").exists():
        log("classifier: done already")
        return
    net = AttributeNet()
    log(f"classifier: AttributeNet {count_params(net)} params")
    g = torch.Generator().manual_seed(args.seed)

    def batch_fn(step: int):
        x, _, y = data.make_batch(args.cls_batch, seed=10_000_000 + step, split="all")
        aug = torch.rand(len(x), generator=g) < 0.5
        x[aug] = degrade(x[aug], g, strength=0.35)
        return x, y

    def loss_fn(n, x, y):
        return sum(F.cross_entropy(o, y[:, i]) for i, o in enumerate(n(x)))

    train_net(
        "classifier", net, out, args.cls_steps, args.cls_batch, 2e-3, args.seed, args.resume, batch_fn, loss_fn, log
    )
    x, _, y = data.make_batch(2000, seed=999_001, split="all")
    acc = AttributeClassifier(net=net).accuracy((x + 1) / 2, y)
    log(f"classifier: accuracy on 2000 fresh renders {acc}")
    atomic_save_json({"accuracy_fresh_renders": acc, "params": count_params(net)}, out / "metrics.json")
    export_net(net, out / "classifier")


@torch.no_grad()
def evaluate_vae(vae, clf: AttributeClassifier, n: int = 1000) -> dict[str, float]:
    """Classifier accuracy and PSNR of VAE reconstructions of ``n`` fresh renders; latent statistics."""
    x, _, y = data.make_batch(n, seed=999_002, split="all")
    lat = torch.cat([vae.encode(x[i : i + 250]).latents for i in range(0, n, 250)])
    rec = torch.cat([vae.decode(lat[i : i + 250]).sample for i in range(0, n, 250)]).clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3))
    res = {f"acc_{k}": v for k, v in clf.accuracy((rec + 1) / 2, y).items()}
    res["psnr"] = float((10 * torch.log10(1 / mse.clamp(min=1e-10))).mean())
    res["latent_mean"] = lat.mean(dim=(0, 2, 3)).tolist()
    res["latent_std"] = lat.std(dim=(0, 2, 3)).tolist()
    res["latent_std_all"] = float(lat.std())
    return res


def stage_vae(root: Path, args: argparse.Namespace) -> None:
    from diffusers import AutoencoderTiny

    out = root / "vae"
    log = Logger(out)
    if (out / "final" / "config.json").exists():
        log("vae: done already")
        return
    vae = AutoencoderTiny(**VAE_CONFIG)
    log(f"vae: AutoencoderTiny {count_params(vae)} params, config {VAE_CONFIG}")
    g = torch.Generator().manual_seed(args.seed + 1)

    def batch_fn(step: int):
        x, _, _ = data.make_batch(args.vae_batch, seed=20_000_000 + step, split="all")
        return x, None

    def loss_fn(v, x, _):
        z = v.encoder(x)
        rec = v.decoder(z + 0.05 * torch.randn(z.shape, generator=g))
        bg = x[:, :, :1, :1]
        w = 1 + 9 * ((x - bg).abs().amax(1, keepdim=True) > 0.05).float()  # x10 on shape pixels
        err = (rec - x).abs()
        rec_loss = (w * (err + err.pow(2))).mean()
        reg = z.mean(dim=(0, 2, 3)).pow(2).mean() + (z.std(dim=(0, 2, 3)) - 1).pow(2).mean()
        return rec_loss + 0.01 * reg

    train_net("vae", vae, out, args.vae_steps, args.vae_batch, 1e-3, args.seed, args.resume, batch_fn, loss_fn, log)
    clf_path = root / "classifier" / "classifier.safetensors"
    while not clf_path.exists():  # the classifier may still be training in a parallel process
        log("vae: waiting for the classifier to evaluate reconstructions")
        time.sleep(30)
    res = evaluate_vae(vae, AttributeClassifier(net=load_net(clf_path.with_suffix(""))))
    vae.register_to_config(scaling_factor=round(1.0 / res["latent_std_all"], 5))
    res["scaling_factor"] = vae.config.scaling_factor
    log(f"vae: reconstructions {res}")
    atomic_save_json({**res, "params": count_params(vae)}, out / "metrics.json")
    vae.save_pretrained(str(out / "final"), safe_serialization=True)


def stage_quality(root: Path, args: argparse.Namespace) -> None:
    out = root / "quality"
    log = Logger(out)
    if (out / "quality.safetensors").exists():
        log("quality: done already")
        return
    net = AttributeNet(**QUALITY_CONFIG)
    g = torch.Generator().manual_seed(args.seed + 2)

    def batch_fn(step: int):
        x, _, _ = data.make_batch(args.cls_batch, seed=30_000_000 + step, split="all")
        y = (torch.rand(len(x), generator=g) < 0.5).float()  # 1 = clean
        bad = y == 0
        x[bad] = degrade(x[bad], g)
        return x, y

    def loss_fn(n, x, y):
        return F.binary_cross_entropy_with_logits(n(x)[0][:, 0], y)

    log(f"quality: {count_params(net)} params")
    train_net(
        "quality", net, out, args.quality_steps, args.cls_batch, 2e-3, args.seed, args.resume, batch_fn, loss_fn, log
    )
    x, y = batch_fn(10**8)
    with torch.no_grad():
        s = net(x)[0][:, 0]
    acc = float(((s > 0).float() == y).float().mean())
    log(
        f"quality: clean-vs-degraded accuracy {acc:.4f}; mean logit clean {s[y == 1].mean():.2f} "
        f"degraded {s[y == 0].mean():.2f}"
    )
    atomic_save_json({"clean_vs_degraded_accuracy": acc, "params": count_params(net)}, out / "metrics.json")
    export_net(net, out / "quality")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="all", choices=("all",) + STAGES)
    p.add_argument("--out", default="runs/shapes", type=Path)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cls-steps", type=int, default=1200)
    p.add_argument("--cls-batch", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--quality-steps", type=int, default=2000)
    p.add_argument("--unet-steps", type=int, default=12000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--unet-data", type=int, default=16000, help="number of pre-encoded training renders")
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--few-step-frac", type=float, default=0.3, help="share of t drawn from the 4-step timesteps")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--unet-config", default="{}", help="JSON overrides of models.UNET_CONFIG (experiments)")
    p.add_argument("--clip-steps", type=int, default=700)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--weights-dir", type=Path, default=None, help="export target (default: the package)")
    args = p.parse_args(argv)
    setup(args.threads, args.seed)
    from . import train_unet

    fns = {
        "classifier": stage_classifier,
        "vae": stage_vae,
        "unet": train_unet.stage_unet,
        "clip": train_unet.stage_clip,
        "quality": stage_quality,
        "export": train_unet.stage_export,
    }
    for s in STAGES if args.stage == "all" else (args.stage,):
        fns[s](args.out, args)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
