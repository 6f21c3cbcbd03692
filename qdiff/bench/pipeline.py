"""``qdiff bench pipeline``: one denoiser step, float vs W8A8 vs W4A8, eager and ``torch.compile``.

The denoiser's real call (positional and keyword inputs) is captured from one pipeline step of the float
model, then replayed on each variant, one model resident at a time, so peak memory is per variant.
"""

from __future__ import annotations

import gc
import os
import time

import torch

from qdiff.bench.report import command_line, machine, markdown_table, time_us
from qdiff.errors import QdiffError


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QdiffError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _capture_step(pipe, prompt: str, height: int | None, width: int | None):
    """(args, kwargs) of the denoiser's first call in a 1-step run (tensors detached and cloned)."""
    from qdiff.models.adapters import find_denoiser

    _, den = find_denoiser(pipe)
    seen: list = []

    def hook(_module, args, kwargs):
        if not seen:
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            seen.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))

    handle = den.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        kw = {k: v for k, v in (("height", height), ("width", width)) if v}
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="latent", **kw)
    finally:
        handle.remove()
    if not seen:
        raise QdiffError("the pipeline never called its denoiser")
    return seen[0]


def _variant(model: str, recipe: str | None, dtype: torch.dtype, dev: torch.device, kernel: str):
    import qdiff
    from qdiff.export.resolve import load_pipeline
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.transform import quantized_layers

    pipe = load_pipeline(model, torch_dtype=dtype)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    if recipe is not None:
        qdiff.quantize(pipe, recipe, progress=False)
        for m in quantized_layers(find_denoiser(pipe)[1]).values():
            m.kernel = kernel
    return pipe


def _step_row(name, pipe, inputs, dev, reps, compile_: bool) -> tuple[list[str], float, float | None]:
    from qdiff.backends.registry import recording
    from qdiff.eval.size import module_nbytes
    from qdiff.models.adapters import find_denoiser

    _, den = find_denoiser(pipe)
    args, kwargs = inputs
    weights_mib = module_nbytes(den) / 2**20
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        with recording() as calls:  # which backend each frozen layer really ran on (fallbacks included)
            den(*args, **kwargs)
        ran = {b: sum(c[0] == b for c in calls) for b in dict.fromkeys(c[0] for c in calls)}
        eager = time_us(lambda: den(*args, **kwargs), dev, reps, warmup=2) / 1e3
        peak = f"{torch.cuda.max_memory_allocated(dev) / 2**20:.0f}" if dev.type == "cuda" else "n/a"
        compiled, note = None, ""
        if compile_:
            try:
                fn = torch.compile(den)
                t0 = time.perf_counter()
                fn(*args, **kwargs)
                note = f"compiled in {time.perf_counter() - t0:.0f} s"
                compiled = time_us(lambda: fn(*args, **kwargs), dev, reps, warmup=2) / 1e3
            except Exception as exc:  # noqa: BLE001 - reported in the table, the other variants still run
                first = str(exc).strip().splitlines()[0][:80] if str(exc).strip() else ""
                note = f"compile failed: {type(exc).__name__}: {first}"
    row = [name, f"{weights_mib:.2f}", f"{eager:.2f}", "—" if compiled is None else f"{compiled:.2f}", peak]
    ran_note = ", ".join(f"{n} {b} calls" for b, n in ran.items())
    return row + ["; ".join(filter(None, (ran_note, note)))], eager, compiled


def run_pipeline_bench(
    model: str,
    *,
    recipes: tuple[str, ...] = ("w8a8", "w4a8"),
    device: str = "auto",
    dtype: str | None = None,
    kernel: str = "auto",
    height: int | None = None,
    width: int | None = None,
    reps: int | None = None,
    compile_: bool | None = None,
    prompt: str = "a red circle on the left",
) -> str:
    """Markdown report of denoiser-step latency and memory for the float model and each recipe."""
    dev = _device(device)
    if dev.type == "cpu" and kernel == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel import
    from qdiff.backends.registry import resolve

    backend = resolve(kernel, dev)  # where covered layers run (named in the report)
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        dtype or ("float16" if dev.type == "cuda" else "float32")
    ]
    compile_ = dev.type == "cuda" if compile_ is None else compile_
    reps = reps or (20 if dev.type == "cuda" else 3)
    mach = machine(dev)

    rows, base = [], None
    for recipe in (None, *recipes):
        pipe = _variant(model, recipe, dt, dev, kernel)
        if base is None:
            inputs = _capture_step(pipe, prompt, height, width)
        name = f"{str(dt).removeprefix('torch.')} (float)" if recipe is None else f"{recipe} ({backend})"
        row, eager, compiled = _step_row(name, pipe, inputs, dev, reps, compile_)
        base = base or (eager, compiled)
        interp = mach.interpreter and recipe is not None and backend == "triton"  # interpreter time is no speed
        row.insert(5, "—" if interp else f"{base[0] / eager:.2f}x")
        row.insert(6, f"{base[1] / compiled:.2f}x" if base[1] and compiled and not interp else "—")
        rows.append(row)
        del pipe
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    shape = next((tuple(a.shape) for a in inputs[0] if isinstance(a, torch.Tensor)), None)
    cols = ["variant", "denoiser MiB", "eager ms", "compiled ms", "peak MiB", "vs float eager",
            "vs float compiled", "note"]  # fmt: skip
    lines = [
        "## Pipeline: `qdiff bench pipeline`",
        mach.header(),
        f"- command: `{command_line()}`",
        f"- model `{model}`, one denoiser call on a latent of shape {shape}, median of {reps} runs; "
        f"kernel `{kernel}`: covered layers run on the `{backend}` backend; the note counts one step's frozen calls "
        "per backend (uncovered layers run on the torch reference)",
    ]
    if dev.type == "cpu" and backend == "torch":
        lines.append(
            "- **CPU: quantized layers run the exact torch reference (integer values in float matmuls), "
            "which is slower than float by design; this checks the plumbing, not kernel speed.**"
        )
    return "\n".join([*lines, "", markdown_table(cols, rows)]) + "\n"
