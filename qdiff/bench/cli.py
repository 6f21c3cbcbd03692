"""Argument parsing and printing for ``qdiff bench kernels | pipeline`` (the work is in kernels.py / pipeline.py)."""

from __future__ import annotations

import argparse

from qdiff.utils.cli_args import image_size, positive_int


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the Triton kernels or a denoiser step (writes a Markdown table)")
    which = p.add_subparsers(dest="bench", required=True)
    k = which.add_parser("kernels", help="W8A8/W4A8 GEMMs vs bf16 torch.mm, torch._int_mm and fp8 _scaled_mm")
    k.add_argument("--device", default="auto", help="cuda, or cpu for the Triton interpreter (default: auto)")
    k.add_argument("--reps", type=positive_int("--reps"), help="timed runs per kernel (default: 50 on GPU, 2 in the "
                   "interpreter)")  # fmt: skip
    k.add_argument("--sweep", action="store_true", help="also time every GPU tile candidate (kernels/tiles.py)")
    k.add_argument("--out", help="also write the table to this Markdown file (atomically)")
    q = which.add_parser("pipeline", help="denoiser step latency and memory: float vs quantized recipes")
    q.add_argument("--model", default="builtin:tiny-sd", help="model spec as for quantize (default: builtin:tiny-sd)")
    q.add_argument("--recipes", default="w8a8,w4a8", help="comma-separated recipes (default: w8a8,w4a8)")
    q.add_argument("--device", default="auto")
    q.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default: float16 on GPU, else float32")
    q.add_argument("--kernel", choices=("auto", "triton", "torch"), default="auto", help="backend of quantized layers")
    q.add_argument("--height", type=image_size("--height"), help="pixels, a multiple of 8 (default: the model's)")
    q.add_argument("--width", type=image_size("--width"), help="pixels, a multiple of 8 (default: the model's)")
    q.add_argument("--reps", type=positive_int("--reps"), help="timed denoiser calls (default: 20 on GPU, 3 on CPU)")
    q.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile (default: on GPU only)")  # fmt: skip
    q.add_argument("--out", help="also write the table to this Markdown file (atomically)")


def run_bench(args) -> int:
    from qdiff.bench.report import write_atomic

    if args.bench == "kernels":
        from qdiff.bench.kernels import run_kernel_bench

        text = run_kernel_bench(args.device, reps=args.reps, sweep=args.sweep)
    else:
        from qdiff.bench.pipeline import run_pipeline_bench

        recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
        text = run_pipeline_bench(
            args.model, recipes=recipes, device=args.device, dtype=args.dtype, kernel=args.kernel,
            height=args.height, width=args.width, reps=args.reps, compile_=args.compile,
        )  # fmt: skip
    print(text, end="")
    if args.out:
        print(f"wrote {write_atomic(args.out, text)}")
    return 0
