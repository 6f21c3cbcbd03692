"""LoRA branch overhead on quantized denoisers (CPU): one denoiser call with a rank-r LoRA vs without.

    python scripts/bench_lora.py --shapes --sdxl /work/scratch/sdxl-real-w8a8 --rank 16 --out lora-bench.md

* ``--shapes``: the bundled Shapes UNet quantized with ``shapes-w8a8``, one sampler call (batch 2: classifier-free
  guidance), float parts in fp32;
* ``--sdxl EXPORT``: a qdiff W8A8 export of a real-size SDXL UNet (a denoiser-only export is enough), one call at
  256 px (latent 32x32, 77 tokens of width 2048), float parts in the CPU compute dtype (bf16 where native).

For each, two LoRA target sets of rank ``--rank`` (alpha = rank; random factors: the cost does not depend on the
values): ``attn`` (to_q, to_k, to_v, to_out.0: diffusers' LoRA training scripts) and ``attn+ff+proj`` (also the
feed-forward and proj_in / proj_out layers). The LoRA is added through the quantized denoiser's ``add_adapter``
(PEFT, qdiff's LoRA layers beside the frozen ones); each round times the call with the adapter disabled and enabled,
alternately, and the table keeps each one's best of ``--rounds`` (other jobs on the machine only ever add time).
Prints a markdown table; ``--out FILE`` also writes it. The 1-minute load average is printed with it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn+ff+proj": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
}


def _seconds(fn) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(unet, args: tuple, kwargs: dict, rank: int, rounds: int) -> list[tuple[str, int, float, float]]:
    """(target set, LoRA layers, best ms without, best ms with) per target set."""
    from peft import LoraConfig

    rows = []
    call = lambda: unet(*args, **kwargs)  # noqa: E731
    with torch.inference_mode():
        call()  # first call: backends prepack their weights
        for name, targets in TARGETS.items():
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name=name)
            with torch.no_grad():
                for n, p in unet.named_parameters():
                    if f"lora_B.{name}." in n:
                        p.normal_(std=0.01)
            layers = sum(1 for m in unet.modules() if name in getattr(m, "lora_A", {}))
            off, on = float("inf"), float("inf")
            call()
            for _ in range(rounds):
                unet.disable_adapters()
                off = min(off, _seconds(call))
                unet.enable_adapters()
                on = min(on, _seconds(call))
            rows.append((name, layers, off * 1e3, on * 1e3))
            unet.delete_adapters(name)
    return rows


def shapes(rank: int, rounds: int):
    import qdiff
    from qdiff.export.resolve import load_pipeline

    pipe = qdiff.quantize(load_pipeline("builtin:shapes"), "shapes-w8a8", progress=False)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500))
    kwargs = {"encoder_hidden_states": torch.randn(2, 20, 128, generator=g)}
    return "Shapes UNet W8A8, batch 2, 16x16 latent, fp32 parts", measure(pipe.unet, args, kwargs, rank, rounds)


def sdxl(folder: str, rank: int, rounds: int):
    from qdiff.bench.cpu_sdxl import unet_inputs
    from qdiff.config.dtypes import cpu_compute_dtype
    from qdiff.export.load import load_denoiser_export
    from qdiff.utils.machine import cpu_flags

    unet = load_denoiser_export(folder).eval()
    dtype = cpu_compute_dtype({torch.float16}, None, cpu_flags())
    unet.to(dtype)  # float parts in the compute dtype; codes stay integer, scales fp32
    args, kwargs = unet_inputs(unet.config, dtype)
    label = f"SDXL UNet W8A8 (real size), 256 px, batch 1, {str(dtype).removeprefix('torch.')} parts"
    return label, measure(unet, args, kwargs, rank, rounds)


def main(argv: list[str] | None = None) -> int:
    from qdiff.bench.report import write_atomic

    p = argparse.ArgumentParser(description="LoRA branch overhead on quantized denoisers (CPU)")
    p.add_argument("--shapes", action="store_true")
    p.add_argument("--sdxl", help="a qdiff W8A8 export of a real-size SDXL UNet")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = []
    if args.shapes:
        sections.append(shapes(args.rank, args.rounds))
    if args.sdxl:
        sections.append(sdxl(args.sdxl, args.rank, args.rounds))
    if not sections:
        p.error("nothing to measure: pass --shapes and/or --sdxl EXPORT")
    lines = [f"LoRA rank {args.rank}, best of {args.rounds} alternating rounds, {args.threads} threads, "
             f"1-minute load average {os.getloadavg()[0]:.2f} at the end", "",
             "| denoiser | LoRA targets | LoRA layers | call without LoRA (ms) | with LoRA (ms) | overhead |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for label, rows in sections:
        for name, layers, off, on in rows:
            lines.append(f"| {label} | {name} | {layers} | {off:.1f} | {on:.1f} | {100 * (on - off) / off:+.1f}% |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_atomic(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
