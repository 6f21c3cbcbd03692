"""``qdiff`` command line: a thin layer over the public API, one sub-command per verb.

Every user error is a :class:`~qdiff.errors.QdiffError`, printed as one line on stderr with exit
code 1 (numbers out of range included: checked while parsing, :mod:`qdiff.utils.cli_args`); argparse's own
syntax errors (a missing option, text where a number goes) print the usage and exit 2; an unexpected failure
prints one line too (set ``QDIFF_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from qdiff.cli_parser import build_parser
from qdiff.engines.openvino.cli import cmd_export_openvino
from qdiff.errors import QdiffError
from qdiff.utils.progress import is_terminal, quiet_library_bars

# quantize/calibrate read the float weights in float32 unless --dtype says otherwise: a float16 checkpoint upcasts
# exactly, while a bfloat16 copy of it would round the weights before they are quantized
_SOURCE_DTYPE = "float32"


def _source_dtype(args) -> str | None:
    """--dtype, else float32 on CPU (an exact upcast) and the checkpoint's own dtypes on an accelerator."""
    return args.dtype or (_SOURCE_DTYPE if str(args.device).startswith("cpu") else None)


EXIT_ERROR = 1
EXIT_INTERNAL = 3


def _output_folder(args) -> Path:
    """``--out`` checked before any heavy work: not existing (unless --overwrite) and writable."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise QdiffError(f"output folder {out} already exists (use --overwrite to replace it)")
    _check_writable(out)
    return out


def _model_spec(args, recipe) -> str:
    spec = args.model or recipe.model
    if not spec:
        raise QdiffError("recipe: model: missing; pass --model PATH_OR_ID or set `model:` in the recipe")
    return spec


def _check_writable(out: Path) -> None:
    """Fail before any heavy work when the output's nearest existing parent is not a writable folder."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QdiffError(f"cannot write {out}: {parent} is not a writable folder")


def cmd_quantize(args) -> int:
    import qdiff
    from qdiff.config.plan import Plan
    from qdiff.eval.size import checkpoint_footprint, module_footprint, module_nbytes, size_line
    from qdiff.export.resolve import load_pipeline, place
    from qdiff.lora.fuse import fuse_recipe_loras, with_loras
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.transform import quantized_layers

    calib = Path(args.calib) if args.calib else None
    if calib is not None and args.plan:
        raise QdiffError("--plan and --calib are exclusive (--calib uses CALIB_DIR/plan.json)")
    if calib is not None and not (calib / "plan.json").is_file():
        raise QdiffError(f"--calib {calib}: no plan.json (not a finished qdiff calibrate folder)")
    default_recipe = _default_recipe(args.model)
    if calib is not None and (calib / "recipe.yaml").is_file():
        default_recipe = calib / "recipe.yaml"
    recipe = with_loras(qdiff.Recipe.load(args.recipe or default_recipe), args.lora)  # inputs checked before work
    if calib is not None:
        _check_calib_loras(calib, recipe)
    plan = Plan.load(args.plan or calib / "plan.json") if (args.plan or calib) else None
    ranges = None
    if calib is not None and (calib / "ranges.json").is_file():
        from qdiff.calib.stats import CapturedStats

        ranges = CapturedStats.load(calib)
    out = _output_folder(args)
    if args.eval and Path(f"{out}-eval").exists() and not args.overwrite:
        raise QdiffError(f"output folder {out}-eval already exists (use --overwrite to replace it)")
    spec = _model_spec(args, recipe)
    t0 = time.perf_counter()
    why = _why_not_stream(args, spec, recipe, plan, ranges)
    if why is None:
        return _stream(args, spec, recipe, plan, ranges, out, t0)
    if not args.in_memory:
        print(f"note       quantizing in memory: {why}")
    pipe = load_pipeline(spec, torch_dtype=args.dtype, config=args.config)
    place(pipe, args.device, _source_dtype(args))
    _, den = find_denoiser(pipe)
    checkpoint, fp_memory = checkpoint_footprint(spec, den), module_footprint(den)
    fuse_recipe_loras(pipe, recipe)  # before the FP reference of --eval: float + LoRA vs quantized + LoRA
    evaluator = _fp_evaluation(args, pipe, recipe) if args.eval else None
    qdiff.quantize(pipe, recipe, plan=plan, progress=not args.no_progress, ranges=ranges)
    q_bytes = module_nbytes(den)
    layers = quantized_layers(den)
    qdiff.save(pipe, out, overwrite=args.overwrite)
    tags: dict[str, int] = {}
    for m in layers.values():
        tags[m.qcfg.tag()] = tags.get(m.qcfg.tag(), 0) + 1
    print(f"model      {spec}")
    print(f"recipe     {recipe.name}: {recipe.description or recipe.weights}")
    print(f"layers     {len(layers)} quantized ({', '.join(f'{n}x {t}' for t, n in sorted(tags.items()))})")
    _print_loras(recipe)
    print(f"denoiser   {size_line(checkpoint, fp_memory, q_bytes)}")  # all measured from tensors
    print(f"export     {out}  ({time.perf_counter() - t0:.1f} s)")
    if evaluator is not None:
        from qdiff.eval.report import markdown_table, save_report
        from qdiff.export.card import add_eval_table

        evaluator.add(recipe.name, pipe)
        result = evaluator.result()
        report = save_report(result, Path(f"{out}-eval"), overwrite=args.overwrite, command=_command_line())
        add_eval_table(out, markdown_table(result))  # into the export's model card (README.md), re-hashed
        print()
        print(markdown_table(result))
        print(f"\neval       {report}/report.md, {report}/grid.png ({time.perf_counter() - t0:.1f} s in all)")
        for note in result.notes:
            print(f"note       {note}")
    return 0


_FLOAT_NAMES = frozenset({"float32", "float16", "bfloat16", "float64"})


def _why_not_stream(args, spec: str, recipe, plan, ranges) -> str | None:
    """None when ``qdiff quantize`` streams (the default for local checkpoints: the float model is never loaded
    whole, qdiff.export.stream), else why the in-memory path runs."""
    from qdiff.export.stream import can_stream, resolve_source

    if args.in_memory:
        return "--in-memory"
    if args.eval:
        return "--eval compares against the float pipeline in memory"
    path = Path(spec).expanduser()
    folder = path.is_dir() and not (path / "qdiff.json").exists()
    local = folder or (path.is_file() and path.suffix == ".safetensors")
    if not local:
        return "only local diffusers folders and .safetensors files stream (builtin models and hub ids load whole)"
    ok, reason = can_stream(recipe, plan, ranges)
    if not ok:
        return reason
    try:  # the denoiser's config.json must be at hand to build it without weights
        resolve_source(spec, args.config)
    except QdiffError as exc:
        return f"cannot stream this source ({exc})"
    return None


def _stream(args, spec: str, recipe, plan, ranges, out: Path, t0: float) -> int:
    from qdiff.export.checkpoint import open_checkpoint
    from qdiff.export.manifest import read_manifest
    from qdiff.export.stream import resolve_source, stream_quantize

    source = resolve_source(spec, args.config)
    with open_checkpoint(source.weights) as reader:
        checkpoint = reader.total_bytes()  # tensor bytes from the headers, in the checkpoint's own dtypes
        dtypes = sorted({str(reader.dtype(k)).removeprefix("torch.") for k in reader.keys()} & _FLOAT_NAMES)
    stream_quantize(spec, recipe, out, plan=plan, ranges=ranges, overwrite=args.overwrite,
                    progress=not args.no_progress, config=args.config, dtype=args.dtype)  # fmt: skip
    manifest = read_manifest(out)
    tags: dict[str, int] = {}
    for entry in manifest["layers"].values():
        q = entry["quant"]
        tag = f"W{q['w_bits']}A{q['a_bits'] or 16}"
        tags[tag] = tags.get(tag, 0) + 1
    with open_checkpoint(out / manifest["denoiser"]["weights"]) as reader:
        quantized = reader.total_bytes()
    unit = 2**30 if checkpoint >= 2**30 else 2**20
    name = "GiB" if unit == 2**30 else "MiB"
    print(f"model      {spec}  (streamed: read one tensor at a time, never loaded whole)")
    print(f"recipe     {recipe.name}: {recipe.description or recipe.weights}")
    counts = ", ".join(f"{n}x {t}" for t, n in sorted(tags.items()))
    print(f"layers     {len(manifest['layers'])} quantized ({counts})")
    _print_loras(recipe)
    print(f"denoiser   {checkpoint / unit:.2f} {name} {'+'.join(dtypes)} checkpoint -> {quantized / unit:.2f} {name} "
          f"quantized ({quantized / checkpoint:.3f}x the checkpoint, measured from the files)")  # fmt: skip
    print(f"export     {out}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def _check_calib_loras(calib: Path, recipe) -> None:
    """A calibration is only valid for the LoRAs it saw fused: the same files (sha256) at the same scales."""
    import qdiff

    seen = qdiff.Recipe.load(calib / "recipe.yaml").loras if (calib / "recipe.yaml").is_file() else ()
    if [(x.sha256, x.scale) for x in seen] != [(x.sha256, x.scale) for x in recipe.loras]:
        fused = " ".join(f"--lora {x.label()}" for x in seen) or "no --lora"
        raise QdiffError(f"--calib {calib} was calibrated with other LoRAs fused; quantize with the same ({fused})")


def _print_loras(recipe) -> None:
    for lora in recipe.loras:
        print(f"lora       {lora.label()} fused into the float weights (sha256 {lora.sha256[:12]}...)")


def _default_recipe(model: str | None) -> str:
    """Without --recipe: the default recipe of the model's family (``qdiff/models/families.py``): e.g.
    ``sdxl-turbo-w8a8`` for ``stabilityai/sdxl-turbo``, ``shapes-w8a8`` for ``builtin:shapes`` and when no model
    is named; ``w8a8`` for toy ``builtin:tiny-*`` pipelines and models of no known family."""
    from qdiff.models.families import current_registry

    return current_registry().default_recipe(model)


def _command_line() -> str:
    return " ".join(["qdiff"] + [a if a and " " not in a else repr(a) for a in sys.argv[1:]])


def _fp_evaluation(args, pipe, recipe):
    """Score the float pipeline (with the recipe's sampler and scheduler) before it is quantized in place."""
    from qdiff.eval.run import Evaluator
    from qdiff.models.schedulers import apply_sampler_scheduler
    from qdiff.sampling.prompts import load_prompts

    prompts = args.eval_prompts or ("shapes-heldout" if recipe.model == "builtin:shapes" else "coco")
    evaluator = Evaluator(load_prompts(prompts, args.eval_num_prompts), recipe.sampler,
                          progress=not args.no_progress)  # fmt: skip
    apply_sampler_scheduler(pipe, recipe.sampler)
    evaluator.add("FP", pipe)
    return evaluator


def cmd_eval(args) -> int:
    import qdiff
    from qdiff.eval.report import markdown_table, save_report
    from qdiff.eval.run import default_setup

    out = _output_folder(args)
    sampler = qdiff.Recipe.load(args.recipe).sampler if args.recipe else default_setup(args.models)[0]
    if args.steps is not None or args.guidance is not None:
        import dataclasses

        guidance = sampler.guidance_scale if args.guidance is None else args.guidance
        sampler = dataclasses.replace(sampler, steps=args.steps or sampler.steps, guidance_scale=guidance)

    def none(v: str) -> str | None:
        return None if v == "none" else v

    result = qdiff.evaluate(args.models, prompts=args.prompts, num_prompts=args.num_prompts, sampler=sampler,
                            seed=args.seed, batch_size=args.batch_size, clip=none(args.clip),
                            quality=none(args.quality), device=args.device, dtype=args.dtype, peers=args.peers,
                            progress=not args.no_progress)  # fmt: skip
    if not _main_rank():  # under torchrun rank 0 holds the images and writes the report
        return 0
    save_report(result, out, overwrite=args.overwrite, command=_command_line())
    print(markdown_table(result))
    for note in result.notes:
        print(f"note       {note}")
    print(f"eval       {out}/report.md, {out}/report.json, {out}/grid.png")
    return 0


def cmd_calibrate(args) -> int:
    import dataclasses

    import qdiff
    from qdiff.calib.run import calibrate_to_folder
    from qdiff.export.resolve import load_pipeline, place
    from qdiff.lora.fuse import fuse_recipe_loras, with_loras

    recipe = qdiff.Recipe.load(args.recipe)
    if args.mode:
        recipe = recipe.replace(sensitivity=dataclasses.replace(recipe.sensitivity, mode=args.mode))
    if args.offload:
        recipe = recipe.replace(calibration=dataclasses.replace(recipe.calibration, offload=args.offload))
    recipe = with_loras(recipe, args.lora)
    out = _output_folder(args)
    spec = _model_spec(args, recipe)
    sequential = recipe.calibration.offload == "sequential" and Path(spec, "model_index.json").is_file()
    if sequential and recipe.loras:
        raise QdiffError("--lora with --offload sequential: the denoiser's blocks stay on disk and cannot be fused; "
                         "use --offload model, or fuse the LoRA into a saved float model first")  # fmt: skip
    if sequential:
        from qdiff.calib.offload import load_offloaded, on_device

        pipe = load_offloaded(spec, torch_dtype=args.dtype)  # the denoiser's blocks stay on disk
        place(pipe, args.device, _source_dtype(args))
        on_device(pipe)
    else:
        pipe = load_pipeline(spec, torch_dtype=args.dtype, config=args.config)
        place(pipe, args.device, _source_dtype(args))
        fuse_recipe_loras(pipe, recipe)  # ranges, sensitivities and the plan of the model that will run
    result = calibrate_to_folder(pipe, recipe, out, overwrite=args.overwrite, progress=not args.no_progress)
    meta = result.plan.meta
    if not _main_rank():
        return 0
    print(
        f"calibration {out}: {len(result.plan.layers)} layers, W {meta['achieved_w_bits']:.3f} bits, "
        f"A {meta['achieved_a_bits']:.3f} bits (plan.json, sensitivity.json/.csv/.png, ranges, calibrate.log)"
    )
    return 0


def cmd_generate(args) -> int:
    import torch

    from qdiff.export.resolve import load_pipeline, place
    from qdiff.quant.transform import get_info
    from qdiff.utils.images import hstack, save_png

    pipe = _generate_pipeline(args, load_pipeline)
    compute = place(pipe, args.device, args.dtype)
    from qdiff.models.adapters import find_denoiser

    info = get_info(find_denoiser(pipe)[1])
    sampler = info.recipe.sampler if info is not None else None
    kwargs = {
        "num_inference_steps": args.steps or _schedule_steps(pipe) or (sampler.steps if sampler else 4),
        "guidance_scale": args.guidance if args.guidance is not None else (sampler.guidance_scale if sampler else 1.0),
    }
    height = args.height or (sampler.height if sampler else None)
    width = args.width or (sampler.width if sampler else None)
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    generator = torch.Generator("cpu").manual_seed(args.seed)
    if not is_terminal(sys.stderr):
        pipe.set_progress_bar_config(disable=True)  # the sampler's step bar: only on a terminal
    images = pipe(args.prompt, generator=generator, **kwargs).images
    out = save_png(hstack(images), args.out)
    dtype = str(compute).removeprefix("torch.") if compute is not None else "mixed"
    print(f"wrote {out} ({len(images)} image(s), {kwargs['num_inference_steps']} steps, seed {args.seed}, {dtype})")
    return 0


def _generate_pipeline(args, load_pipeline):
    """The pipeline ``generate`` runs: ``--engine`` must match the folder (an OpenVINO folder runs on OpenVINO)."""
    from qdiff.engines.openvino import is_openvino_folder

    openvino = is_openvino_folder(args.model)
    if args.engine == "openvino" and not openvino:
        raise QdiffError(f"{args.model} is not an OpenVINO folder; convert the export first: "
                         f"qdiff export-openvino {args.model} OUT")  # fmt: skip
    if args.engine == "torch" and openvino:
        raise QdiffError(f"{args.model} is an OpenVINO folder (qdiff export-openvino); run it with --engine openvino")
    if args.precision and not openvino:
        raise QdiffError("--precision applies to OpenVINO folders (--engine openvino); torch runs use --dtype")
    if args.dtype and openvino:
        raise QdiffError("--dtype applies to torch runs; an OpenVINO folder's float parts take --precision f32|bf16")
    if openvino:
        from qdiff.engines.openvino.precision import parse_precision
        from qdiff.engines.openvino.runtime import load_openvino

        return load_openvino(args.model, precision=parse_precision(args.precision) if args.precision else None)
    return load_pipeline(args.model)


def _schedule_steps(pipe) -> int | None:
    """The step count of an installed Q-Sched schedule (it only runs with that many steps)."""
    from qdiff.sched.qsched import get_schedule

    schedule = get_schedule(pipe)
    return None if schedule is None else schedule.steps


def cmd_inspect(args) -> int:
    from qdiff.backends.registry import REGISTRY
    from qdiff.eval.size import export_report

    print(export_report(Path(args.folder), limit=None if args.all else 40))
    print()
    for name, status in REGISTRY.describe("cpu"):
        print(f"backend    {name}: {status}")
    if args.resident:
        print(_resident_line(Path(args.folder)))
    return 0


def _resident_line(folder: Path) -> str:
    """Load the export on CPU, run one 1-step image so every layer meets its backend, and measure what stays."""
    import dataclasses
    import resource

    from qdiff.backends.registry import recording
    from qdiff.eval.size import resident_bytes
    from qdiff.export.resolve import load_pipeline, place
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.transform import get_info
    from qdiff.sampling.draw import draw

    pipe = load_pipeline(str(folder))
    dtype = place(pipe, "cpu")
    den = find_denoiser(pipe)[1]
    sampler = dataclasses.replace(get_info(den).recipe.sampler, steps=1)
    with recording() as calls:
        draw(pipe, ["a test prompt"], [0], sampler, 1)
    ran = {name: sum(1 for n, _ in calls if n == name) for name in dict.fromkeys(n for n, _ in calls)}
    res, mib = resident_bytes(den), 2**20
    lines = [
        f"resident   denoiser after a 1-step image on this CPU (float parts in {str(dtype).removeprefix('torch.')}; "
        f"frozen calls: {', '.join(f'{k} x{v}' for k, v in ran.items()) or 'none'}): {res.in_memory / mib:.2f} MiB "
        f"in memory vs {res.stored / mib:.2f} MiB with the codes as stored"
    ]
    for where, (layers, nbytes) in res.holders.items():
        lines.append(f"resident   weight codes held as {where}: {layers} layers, {nbytes / mib:.2f} MiB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    lines.append(f"resident   scales, float parameters and buffers: {res.rest / mib:.2f} MiB; this process (whole "
                 f"pipeline, interpreter and imports): peak RSS {peak / mib:.0f} MiB")  # fmt: skip
    return "\n".join(lines)


def cmd_fit_schedule(args) -> int:
    import qdiff
    from qdiff.export.load import load_export
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.transform import get_info

    folder = Path(args.folder)
    out = Path(args.out) if args.out else folder
    if args.out and out.exists() and not args.overwrite:
        raise QdiffError(f"output folder {out} already exists (use --overwrite to replace it)")
    recipe = qdiff.Recipe.load(args.recipe) if args.recipe else None  # validate before any heavy work
    _check_writable(out)
    pipe = load_export(folder)
    recipe = recipe or get_info(find_denoiser(pipe)[1]).recipe
    log = Path(args.log) if args.log else Path(f"{out}.qsched-log.jsonl")
    result = qdiff.fit_schedule(pipe, recipe, prompts=args.prompts, alignment=args.alignment, quality=args.quality,
                                log=log, progress=not args.no_progress)  # fmt: skip
    if not _main_rank():  # under torchrun every rank holds the same result; rank 0 reports and writes
        return 0
    print(result.message)
    print(f"c_eps      {', '.join(f'{v:.4f}' for v in result.schedule.c_eps)}")
    print(f"c_x        {', '.join(f'{v:.4f}' for v in result.schedule.c_x)}")
    from qdiff.sched.guard import format_report

    print("\n".join(format_report(result.report)))  # every metric measured on the validation prompts
    print(f"log        {log}  ({result.new_generations} new of {result.generations} generations)")
    if result.report.get("families"):  # the per-family decision, kept or not (a kept schedule also carries it)
        import json

        from qdiff.bench.report import write_atomic

        report = write_atomic(
            log.with_name(f"{log.stem}.report.json"),
            json.dumps({"message": result.message, **result.report["families"]}, indent=1) + "\n",
        )
        print(f"report     {report}")
    if not result.accepted and not args.out:
        print(f"export     {folder} unchanged")
        return 0
    qdiff.save(pipe, out, overwrite=True if not args.out else args.overwrite)
    print(f"export     {out}")
    return 0


def cmd_bench(args) -> int:
    from qdiff.bench.cli import run_bench

    return run_bench(args)


COMMANDS = {"calibrate": cmd_calibrate, "quantize": cmd_quantize, "generate": cmd_generate, "inspect": cmd_inspect,
            "fit-schedule": cmd_fit_schedule, "bench": cmd_bench, "eval": cmd_eval,
            "export-openvino": cmd_export_openvino}  # fmt: skip


DISTRIBUTED = ("calibrate", "fit-schedule", "eval")  # shard their work under torchrun (docs/distributed.md)


def _run(args) -> int:
    """Run the command; under torchrun (``WORLD_SIZE`` > 1) inside a process group, on this rank's device."""
    from qdiff.distributed.env import detect

    env = detect()
    if not env.distributed:
        return COMMANDS[args.command](args)
    if args.command not in DISTRIBUTED:
        raise QdiffError(f"qdiff {args.command} does not run under torchrun (WORLD_SIZE={env.world_size}); "
                         f"launch it as one process (distributed: {', '.join(DISTRIBUTED)})")  # fmt: skip
    from qdiff.distributed.env import session

    with session(getattr(args, "device", "cpu")) as (_group, device):
        if hasattr(args, "device"):
            args.device = device
        return COMMANDS[args.command](args)


def _main_rank() -> bool:
    """True on rank 0 (or without torchrun): the rank that prints results and writes outputs."""
    from qdiff.distributed.env import current

    return current().is_main


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # qdiff never downloads; fail fast instead of retrying
    try:
        args = build_parser().parse_args(argv)  # numeric options are range-checked here (qdiff.utils.cli_args)
        if args.command != "inspect":  # every other command loads diffusers models
            from qdiff.utils.lazy_imports import defer_bitsandbytes

            defer_bitsandbytes()  # diffusers would import bitsandbytes (and its notices) although no recipe needs it
            if not is_terminal(sys.stderr):  # CI, nohup, a pipe: no bar redraws in the log (qdiff.utils.progress)
                quiet_library_bars()
        return _run(args)
    except BrokenPipeError:  # e.g. `qdiff inspect DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except QdiffError as exc:
        if not getattr(exc, "quiet", False):  # under torchrun only the rank that failed prints the error
            print(f"qdiff: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qdiff: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback unless asked
        if os.environ.get("QDIFF_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"qdiff: internal error: {type(exc).__name__}: {msg} (set QDIFF_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
