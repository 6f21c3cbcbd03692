"""Train the bundled Shapes LoRAs: ``python -m qdiff.models.shapes.train_lora [--name NAME] [--out DIR]``.

Each LoRA overrides one attribute the Shapes classifier judges, whatever the caption asks for: ``white-background``
draws every shape on a white background, ``large`` draws every shape large. Training data are seeded renders of
*training* combinations whose attribute is replaced (``background=white`` / ``size=large``) while the caption keeps
the original words, encoded by the Shapes VAE; the loss is the base model's (v-prediction, 25% of the samples at the
4 sampling timesteps; :mod:`qdiff.models.shapes.train_unet`). Only the LoRA factors train (PEFT ``add_adapter`` on the
UNet's attention, feed-forward and 1x1 projection layers; rank 8, alpha 8); the file is diffusers' LoRA format in
float16 (``StableDiffusionPipeline.save_lora_weights``), a few hundred KB, shipped in
``qdiff/models/shapes/weights/loras/``. About 5 minutes per LoRA on one CPU core of a busy 2-core machine; seeded, so a
rerun gives the same files on the same machine and library versions. docs/lora.md measures them.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from . import data
from .train_unet import _captions, _tokenize, v_loss

LORAS = {"white-background": ("background", "white"), "large": ("size", "large")}  # name -> (attribute, value)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]  # 1x1 convs: proj
OUT = Path(__file__).parent / "weights" / "loras"


def override(a: data.Attributes, attribute: str, value: str) -> data.Attributes:
    """``a`` with ``attribute`` set to ``value`` (a name from :data:`qdiff.models.shapes.data.ATTRIBUTES`)."""
    return dataclasses.replace(a, **{attribute: data.ATTRIBUTES[attribute].index(value)})


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int, attribute: str, value: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training combinations rendered with the attribute overridden: latents (n, 4, 16, 16) * scaling and
    the *original* labels (n, 5), from which captions are drawn."""
    rng = np.random.default_rng(seed)
    lats, labels = [], []
    for start in range(0, n, 256):
        attrs = [data.sample_attributes(rng, "train") for _ in range(min(256, n - start))]
        imgs = np.stack([data.render(override(a, attribute, value), rng) for a in attrs])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        lats.append(vae.encode(x).latents * vae.config.scaling_factor)
        labels.append(torch.tensor([a.as_tuple() for a in attrs]))
    return torch.cat(lats), torch.cat(labels)


@torch.no_grad()
def effect_rate(pipe, clf, attribute: str, value: str, n: int = 64, seed: int = 5000) -> float:
    """Fraction of held-out prompts asking for another ``attribute`` value whose image shows ``value``."""
    want = data.ATTRIBUTES[attribute].index(value)
    prompts = [p for p, a in data.eval_prompts(4 * n, seed) if getattr(a, attribute) != want][:n]
    g = torch.Generator().manual_seed(seed)
    images = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=g, output_type="pt").images
    return float((clf.predict(images)[:, data.ATTRIBUTE_KEYS.index(attribute)] == want).float().mean())


def train(name: str, out: Path, steps: int, batch: int, rank: int, lr: float, n_data: int, seed: int) -> Path:
    """Train one LoRA of :data:`LORAS` and write ``out/<name>.safetensors``; returns the file."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from .models import SCHEDULER_CONFIG
    from .pipeline import shapes_pipeline
    from .scorers import AttributeClassifier

    attribute, value = LORAS[name]
    torch.manual_seed(seed)
    pipe = shapes_pipeline()
    unet, te, tok, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    clf = AttributeClassifier()
    t0 = time.perf_counter()
    lat, labels = encode_dataset(vae, n_data, seed, attribute, value)
    print(f"{name}: encoded {len(lat)} latents in {time.perf_counter() - t0:.0f} s; float effect rate "
          f"{effect_rate(pipe, clf, attribute, value):.3f}", flush=True)  # fmt: skip
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    unet.add_adapter(config, adapter_name=name)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    acp = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rng = np.random.default_rng(seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(len(lat), (batch,), generator=g)
        ids = _tokenize(tok, _captions(labels[idx], rng))
        with torch.no_grad():
            emb = te(ids)[0]
        loss = v_loss(unet, lat[idx], emb, acp, g, 0.25)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"{name}: step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    unet.eval()
    print(f"{name}: float + LoRA effect rate {effect_rate(pipe, clf, attribute, value):.3f}", flush=True)
    state = {k: v.half() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, weight_name=f"{name}.safetensors",
                                              unet_lora_adapter_metadata=unet.peft_config[name].to_dict())  # fmt: skip
    return out / f"{name}.safetensors"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", choices=(*LORAS, "all"), default="all")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--data", type=int, default=4096, help="number of pre-encoded training renders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in LORAS if args.name == "all" else (args.name,):
        path = train(name, args.out, args.steps, args.batch, args.rank, args.lr, args.data, args.seed)
        print(f"{name}: wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", flush=True)


if __name__ == "__main__":
    main()
