"""Stages ``unet`` (UNet + text encoder, jointly, v-prediction, EMA), ``clip`` (scorer) and ``export``.

The UNet trains on pre-encoded latents (N, 4, 16, 16) of seeded renders of *training* combinations, scaled
by the VAE's ``scaling_factor``; captions are re-drawn every step from the stored labels (random template
and synonyms; 10% empty for classifier-free guidance). Every ``--eval-every`` steps the EMA weights sample
held-out prompts with the default 4-step sampler and the classifier's accuracies go to the log.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data
from .checkpoint import (
    EMA,
    Logger,
    atomic_save_json,
    atomic_save_tensors,
    checkpoint_step,
    load_checkpoint,
    save_checkpoint,
)
from .models import SCHEDULER_CONFIG, UNET_CONFIG, clip_config, count_params, text_encoder_config
from .pipeline import DEFAULT_SAMPLER, build_pipeline
from .scorers import AttributeClassifier, load_net
from .tokenizer import load_tokenizer, write_tokenizer

FEW_STEP_TIMESTEPS = torch.tensor([999, 749, 499, 249])  # DDIM trailing, 4 steps


def _encode_dataset(vae, n: int, seed: int, log: Logger) -> dict[str, torch.Tensor]:
    """Render ``n`` training-split images and encode them: latents (n, 4, 16, 16) * scaling, labels (n, 5)."""
    lats, labs = [], []
    for i in tqdm(range(0, n, 250), desc="encode latents"):
        x, _, y = data.make_batch(min(250, n - i), seed=seed + i, split="train")
        with torch.no_grad():
            lats.append(vae.encode(x).latents * vae.config.scaling_factor)
        labs.append(y)
    lat = torch.cat(lats)
    log(f"unet: encoded {n} latents, mean {lat.mean():.3f} std {lat.std():.3f}")
    return {"latents": lat, "labels": torch.cat(labs)}


def _captions(labels: torch.Tensor, rng: np.random.Generator, p_empty: float = 0.1) -> list[str]:
    return ["" if rng.random() < p_empty else data.caption(data.Attributes(*map(int, lab)), rng) for lab in labels]


def _tokenize(tok, captions: list[str]) -> torch.Tensor:
    return tok(
        captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def v_loss(unet, z0: torch.Tensor, emb: torch.Tensor, acp: torch.Tensor, g: torch.Generator, few_frac: float):
    """The v-prediction loss of one batch of latents z0 (B, C, H, W): timesteps uniform in [0, 1000), a share
    ``few_frac`` of them replaced by the 4-step sampler's, noise from ``g`` (drawn in that order)."""
    t = torch.randint(0, 1000, (len(z0),), generator=g)
    few = torch.rand(len(z0), generator=g) < few_frac
    t[few] = FEW_STEP_TIMESTEPS[torch.randint(0, 4, (int(few.sum()),), generator=g)]
    noise = torch.randn(z0.shape, generator=g)
    a = acp[t].sqrt()[:, None, None, None]
    s = (1 - acp[t]).sqrt()[:, None, None, None]
    return F.mse_loss(unet(a * z0 + s * noise, t, emb).sample, a * noise - s * z0)


@torch.no_grad()
def evaluate_pipeline(
    pipe, clf: AttributeClassifier, n: int, seed: int, split: str = "heldout", batch: int = 64, **sampler
) -> dict[str, float]:
    """Classifier accuracy of ``n`` images for held-out (or training) prompts, fixed seeds."""
    if split == "heldout":
        prompts = data.eval_prompts(n, seed)
    else:
        rng = np.random.default_rng(seed)
        prompts = [(data.caption(a, rng), a) for a in (data.sample_attributes(rng, "train") for _ in range(n))]
    kw = {k: v for k, v in {**DEFAULT_SAMPLER, **sampler}.items() if k in ("num_inference_steps", "guidance_scale")}
    imgs = []
    for i in range(0, n, batch):
        g = torch.Generator().manual_seed(seed + i)
        imgs.append(pipe([p for p, _ in prompts[i : i + batch]], generator=g, output_type="pt", **kw).images)
    labels = torch.tensor([a.as_tuple() for _, a in prompts])
    return clf.accuracy(torch.cat(imgs), labels)


def stage_unet(root: Path, args: argparse.Namespace) -> None:
    from diffusers import AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = root / "unet"
    log = Logger(out)
    finished = checkpoint_step(out / "ckpt.safetensors") >= args.unet_steps
    if (out / "final" / "unet" / "config.json").exists() and finished:
        log("unet: done already (raise --unet-steps and pass --resume to train further)")
        return
    vae = AutoencoderTiny.from_pretrained(str(root / "vae" / "final")).eval()
    tok = load_tokenizer(write_tokenizer(out / "tokenizer"))
    clf = AttributeClassifier(net=load_net(root / "classifier" / "classifier"))
    lat_path = out / "latents.safetensors"
    if not lat_path.exists():
        atomic_save_tensors(_encode_dataset(vae, args.unet_data, 40_000_000, log), lat_path)
    from safetensors.torch import load_file

    ds = load_file(str(lat_path))
    lat, labels = ds["latents"], ds["labels"]
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, **json.loads(args.unet_config)})
    te = CLIPTextModel(CLIPTextConfig(**text_encoder_config()))
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    ema_u, ema_t = EMA(unet, args.ema_decay), EMA(te, args.ema_decay)
    mods = {"unet": unet, "te": te, "ema_unet": ema_u.model, "ema_te": ema_t.model}
    ckpt, start = out / "ckpt.safetensors", 0
    if args.resume and ckpt.exists():
        meta = load_checkpoint(ckpt, mods, opt)
        start = ema_u.num_updates = ema_t.num_updates = meta["step"]
        log(f"unet: resumed at step {start}")
    else:
        log(f"unet: UNet {count_params(unet)} params, text encoder {count_params(te)} params, {len(lat)} latents")
    unet.train()
    te.train()
    acp = sched.alphas_cumprod
    for step in tqdm(range(start, args.unet_steps), desc="unet", initial=start, total=args.unet_steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        rng = np.random.default_rng(args.seed * 1_000_003 + step)
        for gr in opt.param_groups:
            gr["lr"] = args.unet_lr * min(1.0, (step + 1) / 200)
        idx = torch.randint(len(lat), (args.unet_batch,), generator=g)
        z0 = lat[idx]
        emb = te(_tokenize(tok, _captions(labels[idx], rng)))[0]
        loss = v_loss(unet, z0, emb, acp, g, args.few_step_frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_u.update(unet)
        ema_t.update(te)
        if step % 50 == 0:
            log(f"unet step {step} loss {loss.item():.4f}")
        done = step + 1
        if done % args.ckpt_every == 0 or done == args.unet_steps:
            save_checkpoint(ckpt, mods, opt, {"step": done, "seed": args.seed})
        if done % args.eval_every == 0 or done == args.unet_steps:
            pipe = build_pipeline(ema_u.model, ema_t.model, vae, tok)
            held = evaluate_pipeline(pipe, clf, 64, seed=5000)
            train = evaluate_pipeline(pipe, clf, 32, seed=6000, split="train")
            log(f"unet eval step {done}: heldout {_fmt(held)} | train-prompts {_fmt(train)}")
    pipe = build_pipeline(ema_u.model, ema_t.model, vae, tok)
    final = evaluate_pipeline(pipe, clf, 256, seed=7000)
    log(f"unet final (256 held-out prompts, 4 steps): {_fmt(final)}")
    norms = token_norms(ema_t.model, tok, [p for p, _ in data.eval_prompts(256, 7000)])
    log(f"unet: text-encoder output norms {norms}")
    atomic_save_json(
        {
            "heldout_256_4steps": final,
            "text_encoder_norms": norms,
            "unet_params": count_params(unet),
            "text_encoder_params": count_params(te),
            "steps": args.unet_steps,
        },
        out / "metrics.json",
    )
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(out / "final", ignore_errors=True)
    tmp.rename(out / "final")


@torch.no_grad()
def token_norms(text_encoder, tok, prompts: list[str]) -> dict[str, float]:
    """L2 norms of the text encoder's output per position: BOS (position 0) vs word tokens vs padding/EOS."""
    ids = _tokenize(tok, prompts)
    h = text_encoder(ids)[0].norm(dim=-1)  # (N, L)
    words = (ids != tok.bos_token_id) & (ids != tok.eos_token_id)
    return {
        "bos_mean": float(h[:, 0].mean()),
        "word_mean": float(h[words].mean()),
        "word_max": float(h[words].max()),
        "eos_pad_mean": float(h[ids == tok.eos_token_id].mean()),
        "bos_over_word_ratio": float(h[:, 0].mean() / h[words].mean()),
    }


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in acc.items())


def stage_clip(root: Path, args: argparse.Namespace) -> None:
    from transformers import CLIPConfig, CLIPModel

    out = root / "clip"
    log = Logger(out)
    if (out / "final" / "config.json").exists():
        log("clip: done already")
        return
    tok = load_tokenizer(write_tokenizer(out / "tokenizer"))
    torch.manual_seed(args.seed + 3)
    model = CLIPModel(CLIPConfig(**clip_config()))
    log(f"clip: {count_params(model)} params")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    ckpt, start = out / "ckpt.safetensors", 0
    if args.resume and ckpt.exists():
        start = load_checkpoint(ckpt, {"clip": model}, opt)["step"]
        log(f"clip: resumed at step {start}")
    model.train()
    templates = data.TRAIN_TEMPLATES + data.HELDOUT_TEMPLATES
    for step in tqdm(range(start, args.clip_steps), desc="clip", initial=start, total=args.clip_steps):
        rng = np.random.default_rng(50_000_000 + step)
        x, _, y = data.make_batch(128, seed=50_000_000 + step, split="all")
        caps = [data.caption(data.Attributes(*map(int, lab)), rng, templates) for lab in y]
        # positives: same attributes, where a caption without background matches any background
        names = [data.parse_caption(c) for c in caps]
        same4 = (y[:, None, :4] == y[None, :, :4]).all(-1)
        has_bg = torch.tensor(["background" in n for n in names])
        pos = (same4 & ((y[:, None, 4] == y[None, :, 4]) | ~has_bg[None, :])).float()
        logits = model(input_ids=_tokenize(tok, caps), pixel_values=x).logits_per_image  # (image, text)
        loss = 0.5 * (
            -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            - (pos.T / pos.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        )
        for gr in opt.param_groups:
            gr["lr"] = 5e-4 * min(1.0, (step + 1) / 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(f"clip step {step} loss {loss.item():.4f}")
        if (step + 1) % 100 == 0 or step + 1 == args.clip_steps:
            save_checkpoint(ckpt, {"clip": model}, opt, {"step": step + 1})
    model.eval()
    model.save_pretrained(str(out / "final"), safe_serialization=True)
    from .scorers import ClipScorer

    scorer = ClipScorer.__new__(ClipScorer)  # wrap the in-memory model, no reload
    scorer.model, scorer.tokenizer = model, tok
    res = clip_rank_accuracy(scorer)
    log(f"clip: ranking accuracy on 1000 fresh renders {res}")
    atomic_save_json({**res, "params": count_params(model)}, out / "metrics.json")


@torch.no_grad()
def clip_rank_accuracy(scorer, n: int = 1000) -> dict[str, float]:
    """Fraction of real renders whose true caption scores above a random mismatched / one-attribute-changed one."""
    rng = np.random.default_rng(999_003)
    x, _, y = data.make_batch(n, seed=999_003, split="all", templates=data.HELDOUT_TEMPLATES)
    true_c, rand_c, hard_c = [], [], []
    for lab in y.tolist():
        a = data.Attributes(*lab)
        true_c.append(data.caption(a, rng, data.HELDOUT_TEMPLATES))
        other = data.sample_attributes(rng, "all")
        while other == a:
            other = data.sample_attributes(rng, "all")
        rand_c.append(data.caption(other, rng, data.HELDOUT_TEMPLATES))
        k = int(rng.integers(5))
        b = list(lab)
        b[k] = (b[k] + 1 + int(rng.integers(data.NUM_CLASSES[k] - 1))) % data.NUM_CLASSES[k]
        hard_c.append(data.caption(data.Attributes(*b), rng, data.HELDOUT_TEMPLATES))
    imgs = (x + 1) / 2
    st, sr, sh = scorer.score(imgs, true_c), scorer.score(imgs, rand_c), scorer.score(imgs, hard_c)
    return {
        "vs_random_caption": float((st > sr).float().mean()),
        "vs_one_attribute_changed": float((st > sh).float().mean()),
        "mean_score_true": float(st.mean()),
        "mean_score_random": float(sr.mean()),
    }


def _to_fp16(folder: Path) -> None:
    """Rewrite every ``*.safetensors`` under ``folder`` with float tensors stored as float16 (halves the size;
    loaders upcast to float32)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    for f in folder.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
        t = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
        atomic_save_tensors(t, f, metadata=meta)


def _drop_derived_vae_key(config: Path) -> None:
    """AutoencoderTiny saves ``block_out_channels`` (derived from ``decoder_block_out_channels``) but warns that
    it is unexpected on every load; the shipped config leaves it out (loading re-derives it)."""
    cfg = json.loads(config.read_text())
    if "decoder_block_out_channels" in cfg and cfg.pop("block_out_channels", None) is not None:
        atomic_save_json(cfg, config)


def stage_export(root: Path, args: argparse.Namespace) -> None:
    """Copy the trained parts into the shipped weights folder (diffusers layout + scorers), weights in fp16."""
    dst = Path(args.weights_dir or Path(__file__).parent / "weights")
    log = Logger(root / "export")
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
        shutil.copytree(root / "unet" / "final" / sub, dst / sub, dirs_exist_ok=True)
    shutil.copy(root / "unet" / "final" / "model_index.json", dst / "model_index.json")
    shutil.copytree(root / "clip" / "final", dst / "clip", dirs_exist_ok=True)
    for name in ("classifier", "quality"):
        for ext in (".safetensors", ".json"):
            shutil.copy(root / name / (name + ext), dst / (name + ext))
    atomic_save_json(DEFAULT_SAMPLER, dst / "sampler.json")
    _drop_derived_vae_key(dst / "vae" / "config.json")
    _to_fp16(dst)
    total = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    log(f"export: wrote {dst} ({total / 1e6:.2f} MB)")
    if total > 20e6:
        raise RuntimeError(f"shipped weights are {total / 1e6:.1f} MB > 20 MB")
