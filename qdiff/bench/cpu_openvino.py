"""``qdiff bench cpu --engine openvino``: the Shapes pipeline on torch and on OpenVINO, side by side (issue 23).

Every variant is resident at once and timed in interleaved rounds (pipeline: one batch of held-out prompts; denoiser:
one call on the same CFG-doubled batch), ratios against torch bf16 as the issue states them. Variants: torch fp32 /
bf16; qdiff W8A8 (dynamic, ``cpu_int8``); OpenVINO fp32 / bf16 (the float model, qdiff's exporter); qdiff
``shapes-w8a8-static`` and ``shapes-w8a8`` exported to OpenVINO with the default float precisions; NNCF's int8
(``nncf.quantize``, TRANSFORMER, calibrated on the same 32 calibration prompts as the static recipe) with f32 and bf16
float parts. SSIM against torch fp32 (same prompts and seeds); for qdiff's OpenVINO rows also against the same
quantization run by qdiff's torch backends (the engine's tolerance).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qdiff.bench.cpu import INT8, best_of_rounds
from qdiff.bench.cpu_pipeline import set_kernel
from qdiff.bench.report import markdown_table
from qdiff.calib.metrics import ssim
from qdiff.config.recipe import Recipe
from qdiff.export.resolve import load_pipeline, place
from qdiff.sampling.draw import draw
from qdiff.sampling.prompts import load_prompts

MODEL = "builtin:shapes"
PROMPTS = "shapes-heldout"
BATCH, QUICK_BATCH = 16, 2


@dataclass(frozen=True)
class Variant:
    name: str
    pipe: object
    twin: str | None = None  # the torch variant running the same quantization (its tolerance row)


@dataclass(frozen=True)
class Row:
    name: str
    pipe_s: float  # best seconds per image
    call_s: float  # best seconds per denoiser call
    ssim_fp32: float
    ssim_twin: float | None
    unet_mib: float | None  # the OpenVINO UNet's weights file on disk


def _quantized(base, recipe: str, plan: str | None = None):
    """A quantized copy of ``base`` (``plan``: a plan.json path) on qdiff's int8 CPU kernels."""
    import qdiff

    pipe = qdiff.quantize(copy.deepcopy(base), recipe, plan=plan, progress=False)
    set_kernel(pipe, INT8)
    return pipe


def _variants(tmp: Path, mixdq_plan: str | None) -> list[Variant]:
    from qdiff.engines.openvino.export import write_openvino
    from qdiff.engines.openvino.runtime import load_openvino
    from qdiff.eval.peers import PEERS

    base = load_pipeline(MODEL)
    bf16 = copy.deepcopy(base)
    place(bf16, "cpu", torch.bfloat16)
    dynamic = _quantized(base, "shapes-w8a8")
    static = _quantized(base, "shapes-w8a8-static")
    mixdq = _quantized(base, "shapes-mixdq-w4a8", mixdq_plan) if mixdq_plan else None

    def openvino(pipe, name: str, precision=None):
        folder = tmp / name
        folder.mkdir()
        write_openvino(pipe, folder, precision=precision, progress=False)
        return load_openvino(folder)

    nncf, _ = PEERS["openvino-nncf-int8"].build(lambda: load_pipeline(MODEL), Recipe.load("shapes-w8a8-static"), [])
    nncf_bf16 = load_openvino(nncf._qdiff_folder.name, precision="bf16")
    twin_static, twin_dynamic = f"qdiff W8A8-static ({INT8}), fp32 parts", f"qdiff W8A8 ({INT8}), fp32 parts"
    twin_mixdq = f"qdiff MixDQ W4A8 ({INT8}), fp32 parts"
    extra: list[Variant] = []
    if mixdq is not None:
        extra = [
            Variant(twin_mixdq, mixdq),
            Variant("qdiff MixDQ W4A8 on OpenVINO", openvino(mixdq, "mixdq"), twin_mixdq),
        ]
    float_f32 = openvino(base, "fp32", "f32")
    # the precision given to write_openvino is only recorded: the bf16 row loads the same float folder in bf16
    float_bf16 = load_openvino(tmp / "fp32", precision="bf16")
    return [
        Variant("torch fp32", base),
        Variant("torch bf16", bf16),
        Variant(twin_dynamic, dynamic),
        Variant(twin_static, static),
        Variant("OpenVINO fp32", float_f32),
        Variant("OpenVINO bf16", float_bf16),
        Variant("qdiff W8A8-static on OpenVINO", openvino(static, "static"), twin_static),
        Variant("qdiff W8A8 on OpenVINO", openvino(dynamic, "dynamic"), twin_dynamic),
        *extra,
        Variant("NNCF int8 on OpenVINO, f32 parts", nncf),
        Variant("NNCF int8 on OpenVINO, bf16 parts", nncf_bf16),
    ]


def _unet_call(pipe, inputs: dict[str, Tensor]) -> Callable[[], object]:
    return lambda: pipe.unet(**inputs)


def _unet_inputs(pipe, prompts: list[str]) -> dict[str, Tensor]:
    """One denoiser call's inputs as the pipeline builds them (CFG-doubled batch, mid-schedule timestep)."""
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    hidden = torch.cat([negative, embeds]).float()
    side = pipe.unet.config.sample_size
    sample = torch.randn(hidden.shape[0], pipe.unet.config.in_channels, side, side,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    return {"sample": sample, "timestep": torch.tensor(499), "encoder_hidden_states": hidden}


def openvino_section(rounds: int, quick: bool, mixdq_plan: str | None = None) -> str:
    """The Markdown section: per-image and per-call times vs torch bf16, SSIM, and how each was measured.
    ``mixdq_plan``: a ``shapes-mixdq-w4a8`` plan (``qdiff calibrate``'s plan.json) adds MixDQ W4A8 rows."""
    recipe = Recipe.load("shapes-w8a8-static")
    batch = QUICK_BATCH if quick else BATCH
    prompts = load_prompts(PROMPTS, batch)
    seeds = list(range(batch))
    with tempfile.TemporaryDirectory(prefix="qdiff-bench-ov-") as tmp, torch.inference_mode():
        variants = _variants(Path(tmp), mixdq_plan)
        inputs = _unet_inputs(variants[0].pipe, prompts)
        images = {v.name: draw(v.pipe, prompts, seeds, recipe.sampler, batch) for v in variants}  # warm-up
        pipe_best, r1 = best_of_rounds(
            {v.name: (lambda p=v.pipe: draw(p, prompts, seeds, recipe.sampler, batch)) for v in variants}, rounds
        )
        call_inputs = {v.name: {k: t.to(_dtype(v.pipe)) for k, t in inputs.items()} for v in variants}
        call_best, r2 = best_of_rounds({v.name: _unet_call(v.pipe, call_inputs[v.name]) for v in variants}, rounds)
    ref = images["torch fp32"]
    rows = [
        Row(v.name, pipe_best[v.name] / batch, call_best[v.name], float(ssim(images[v.name], ref).mean()),
            float(ssim(images[v.name], images[v.twin]).mean()) if v.twin else None, _unet_mib(v.pipe))
        for v in variants
    ]  # fmt: skip
    return _render(rows, batch, min(r1, r2), recipe, inputs)


def _unet_mib(pipe) -> float | None:
    """The OpenVINO UNet's weights file on disk (None for a torch pipeline)."""
    nbytes = getattr(pipe.unet, "disk_nbytes", None)
    return None if nbytes is None else nbytes() / 2**20


def _dtype(pipe) -> torch.dtype:
    return getattr(pipe.unet, "dtype", torch.float32)


def _render(rows: list[Row], batch: int, rounds: int, recipe: Recipe, inputs: dict[str, Tensor]) -> str:
    base = next(r for r in rows if r.name == "torch bf16")
    table = [
        [r.name, f"{r.pipe_s * 1e3:.1f}", f"{r.pipe_s / base.pipe_s:.2f}x", f"{r.call_s * 1e3:.1f}",
         f"{r.call_s / base.call_s:.2f}x", f"{r.ssim_fp32:.4f}", "-" if r.ssim_twin is None else f"{r.ssim_twin:.4f}",
         "-" if r.unet_mib is None else f"{r.unet_mib:.2f}"]
        for r in rows
    ]  # fmt: skip
    cols = ["variant", "ms / image", "pipeline vs torch bf16", "ms / denoiser call", "call vs torch bf16",
            "SSIM vs torch fp32", "SSIM vs its torch twin", "UNet MiB on disk"]  # fmt: skip
    s = recipe.sampler
    call = "x".join(str(d) for d in inputs["sample"].shape)
    intro = (
        "### OpenVINO (issue 23)\n\n"
        f"`{MODEL}`, {s.steps} steps, {s.height}x{s.width} px, guidance {s.guidance_scale:g}; {batch} prompts of "
        f"`{PROMPTS}` in one batch, seeds 0..{batch - 1}; denoiser call: sample {call} (the CFG-doubled batch), "
        f"timestep 499; best of {rounds} interleaved rounds, every variant resident. OpenVINO rows: qdiff's exporter "
        "(`qdiff export-openvino`), CPU plugin, latency hint; qdiff rows with the default float precisions "
        "(bf16 float parts in every component). NNCF int8: `nncf.quantize(model_type=TRANSFORMER)` calibrated on the "
        "UNet inputs of the 32 `shapes` calibration prompts (every step), as the static recipe calibrates. "
        "\"SSIM vs its torch twin\": the same quantization run by qdiff's torch backends (the engine's tolerance)."
    )
    return intro + "\n\n" + markdown_table(cols, table)
