"""``qdiff`` command line arguments: one ``_add_<verb>`` per sub-command, :func:`build_parser` for all of them.

Numbers are range-checked while parsing (:mod:`qdiff.utils.cli_args`), so a bad value is a one-line error before
any work; the commands themselves are in :mod:`qdiff.cli`.
"""

from __future__ import annotations

import argparse

from qdiff.utils.cli_args import image_size, non_negative_float, positive_int, seed


def _add_lora(p) -> None:
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="fuse this .safetensors LoRA into the float weights first (scale default 1.0; repeat for "
                   "several, fused in order; replaces the recipe's loras), see docs/lora.md")  # fmt: skip


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a pipeline with a recipe (or a plan) and export it")
    p.add_argument("--model", help="local diffusers folder, hub id in the local cache, or builtin:NAME")
    p.add_argument("--recipe", help="bundled recipe name or YAML path (default: w8a8, or CALIB_DIR/recipe.yaml)")
    p.add_argument("--plan", help="per-layer plan JSON (from qdiff calibrate); the recipe supplies the rest")
    p.add_argument("--calib", help="folder written by qdiff calibrate: its plan, ranges and (default) recipe")
    p.add_argument("--config", help="diffusers folder with the pipeline configs for a --model .safetensors file")
    p.add_argument("--out", required=True, help="export folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="load the model in")
    p.add_argument("--device", default="cpu", help="device for calibration and packing (default: cpu)")
    p.add_argument("--eval", action="store_true", help="also compare FP vs quantized (qdiff eval) into OUT-eval/")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole float model instead of streaming a local checkpoint tensor by tensor "
                   "(streaming is the default where the recipe needs no forward pass)")  # fmt: skip
    _add_lora(p)
    p.add_argument("--eval-prompts", default=None, help="prompts for --eval (default: shapes-heldout or coco)")
    p.add_argument("--eval-num-prompts", type=positive_int("--eval-num-prompts"), default=256,
                   help="number of --eval prompts (default: 256)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="compare pipelines on the same prompts and seeds: metrics table and image grid")
    p.add_argument("models", nargs="+", help="export folders / models; the first is the SSIM/PSNR reference")
    p.add_argument("--out", required=True, help="folder to create: report.json, report.md, grid.png")
    p.add_argument("--prompts", help="prompt set name or .txt file (default: shapes-heldout for builtin:shapes "
                   "and its exports, else coco)")  # fmt: skip
    p.add_argument("--num-prompts", type=positive_int("--num-prompts"), default=64,
                   help="first N prompts of the set (default: 64)")  # fmt: skip
    p.add_argument("--recipe", help="recipe whose sampler is used (default: the first export's recipe)")
    p.add_argument("--steps", type=positive_int("--steps"), help="override the sampler's steps")
    p.add_argument("--guidance", type=non_negative_float("--guidance"), help="override the sampler's guidance scale")
    p.add_argument("--seed", type=seed("--seed"), default=0, help="prompt i uses seed SEED+i (default: 0)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=16, help="images per pipeline call")
    p.add_argument("--clip", default="auto", help="CLIP scorer spec, 'auto' or 'none' (default: auto)")
    p.add_argument("--quality", default="auto", help="no-reference quality scorer spec, 'auto' or 'none'")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="compute dtype of the float parts of every model (default on CPU: float32, or bfloat16 for a float16 "
        "model on a CPU with native bf16)",
    )
    p.add_argument(
        "--peers",
        help="also build and score peer quantizers from the first (float) model: comma-separated bnb-nf4, bnb-int8, "
        "quanto-w8a8, quanto-w4, torchao-int8dq, torchao-int8wo, torchao-int4wo, openvino-fp32, openvino-nncf-int8, "
        "or all (pip install 'qdiff[peers]', 'qdiff[openvino]')",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with an export folder or any model")
    p.add_argument("model", help="export folder, diffusers folder, hub id (local cache) or builtin:NAME")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several images)")
    p.add_argument("--steps", type=positive_int("--steps"), help="sampling steps (default: the export's recipe or 4)")
    p.add_argument("--guidance", type=non_negative_float("--guidance"),
                   help="guidance scale (default: the export's recipe, else 1.0)")  # fmt: skip
    p.add_argument("--seed", type=seed("--seed"), default=0, help="generator seed (default: 0)")
    p.add_argument("--height", type=image_size("--height"), help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=image_size("--width"), help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="compute dtype of the float parts (default on CPU: float32, or bfloat16 for a float16 model "
        "on a CPU with native bf16; quantized layers always keep their integer codes and fp32 scales)",
    )
    p.add_argument("--engine", choices=("auto", "torch", "openvino"), default="auto",
                   help="what runs MODEL: torch (qdiff's backends), openvino (a folder from qdiff export-openvino), "
                   "or auto: by the folder (default)")  # fmt: skip
    p.add_argument("--precision", help="openvino: float precision of the non-quantized parts (f32, bf16 or "
                   "COMPONENT=PRECISION,...; default: the folder's)")  # fmt: skip
    p.add_argument("--out", required=True, help="PNG path; several prompts are written side by side")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="table of layers, bits and bytes of an export folder")
    p.add_argument("folder")
    p.add_argument("--all", action="store_true", help="list every layer (default: the first 40)")
    p.add_argument("--resident", action="store_true",
                   help="also load the export on CPU, draw one 1-step image and measure the bytes it keeps in "
                   "memory (packed codes + the int8 copies the cpu_int8 backend prepacks)")  # fmt: skip


def _add_fit_schedule(sub) -> None:
    p = sub.add_parser("fit-schedule", help="fit Q-Sched scheduler coefficients on a quantized export (JAQ loss)")
    p.add_argument("folder", help="quantized export folder (from qdiff quantize)")
    p.add_argument("--prompts", help="prompt set name or .txt file (default: the recipe's qsched/calibration prompts)")
    p.add_argument("--recipe", help="recipe whose qsched: and sampler: sections are used (default: the export's)")
    p.add_argument("--out", help="export folder to write (default: update FOLDER in place, atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--alignment", help="alignment scorer spec, overrides the recipe (e.g. open_clip:ViT-B-32:PATH)")
    p.add_argument("--quality", help="quality scorer spec, overrides the recipe (e.g. pyiqa:piqe)")
    p.add_argument("--log", help="JSONL evaluation log; rerunning with it resumes (default: OUT.qsched-log.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="MixDQ calibration: ranges, per-layer sensitivity, ILP bit allocation")
    p.add_argument("--model", help="local diffusers folder, hub id in the local cache, or builtin:NAME")
    p.add_argument("--recipe", required=True, help="bundled recipe name (e.g. mixdq-w4a8) or YAML path")
    p.add_argument("--out", required=True, help="folder to create: ranges, sensitivity table/plot, plan.json, log")
    p.add_argument("--mode", choices=("fast", "full"), help="override sensitivity.mode of the recipe")
    p.add_argument("--config", help="diffusers folder with the pipeline configs for a --model .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="load the model in")
    p.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    p.add_argument("--offload", choices=("none", "model", "sequential"), default=None,
                   help="bounded memory: components (model) or denoiser blocks (sequential, read from disk one at a "
                        "time) off the device; default: the recipe's calibration.offload")  # fmt: skip
    _add_lora(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    from qdiff import __version__

    parser = argparse.ArgumentParser(prog="qdiff", description="Post-training quantization for few-step diffusion.")
    parser.add_argument("--version", action="version", version=f"qdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_calibrate(sub)
    _add_quantize(sub)
    _add_generate(sub)
    _add_inspect(sub)
    _add_fit_schedule(sub)
    _add_eval(sub)
    from qdiff.bench.cli import add_bench_parser
    from qdiff.engines.openvino.cli import add_export_openvino_parser

    add_bench_parser(sub)
    add_export_openvino_parser(sub)
    return parser
