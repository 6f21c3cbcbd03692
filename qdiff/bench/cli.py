"""Argument parsing and printing for ``qdiff bench kernels | pipeline | cpu`` (the work is in kernels.py,
pipeline.py and cpu.py)."""

from __future__ import annotations

import argparse
import sys

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
    c = which.add_parser("cpu", help="the cpu_int8 backend vs fp32 / bf16: per layer, Shapes pipeline, SDXL UNet")
    c.add_argument("--layers", action="store_true", help="per-layer table (Linear 1024xKxN shapes, 3x3 conv)")
    c.add_argument("--pipeline", action="store_true", help="Shapes pipeline s/image, SSIM and exactness")
    c.add_argument("--sdxl", metavar="FOLDER", help="also one real-size SDXL UNet call (a diffusers folder with "
                   "unet/; needs ~14 GiB of free memory)")  # fmt: skip
    c.add_argument("--rounds", type=positive_int("--rounds"), default=5,
                   help="interleaved timing rounds (default: 5; SDXL: at most 3 warm calls)")  # fmt: skip
    c.add_argument("--threads", type=positive_int("--threads"),
                   help="torch threads (default: one per core); 1: steadier ratios on a busy machine")  # fmt: skip
    c.add_argument("--engine", choices=("torch", "openvino"), default="torch",
                   help="openvino: the Shapes pipeline on OpenVINO beside torch, NNCF (docs/openvino.md)")  # fmt: skip
    c.add_argument("--mixdq-plan", metavar="PLAN", help="with --engine openvino: also MixDQ W4A8 rows from a "
                   "shapes-mixdq-w4a8 plan (qdiff calibrate's plan.json)")  # fmt: skip
    c.add_argument("--quick", action="store_true", help="smallest layer shapes, 2-image batch (a smoke test)")
    c.add_argument("--out", help="also write the report to this Markdown file (atomically)")


def run_bench(args) -> int:
    from qdiff.bench.report import write_atomic

    if args.bench == "cpu":
        from qdiff.bench.cpu import run_cpu_bench

        openvino = args.engine == "openvino"
        every = not (args.layers or args.pipeline or args.sdxl or openvino)  # nothing chosen: layers and pipeline
        text = run_cpu_bench(layers=args.layers or every, pipeline=args.pipeline or every, sdxl=args.sdxl,
                             rounds=args.rounds, quick=args.quick, threads=args.threads,
                             openvino=openvino, mixdq_plan=args.mixdq_plan)  # fmt: skip
    elif args.bench == "kernels":
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
    if "DIFFERS" in text:  # an int8 result that is not the reference's: the report shows where
        print("qdiff: error: an int8 output differs from the torch reference (see the table)", file=sys.stderr)
        return 1
    return 0
