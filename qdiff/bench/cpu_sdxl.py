"""One real-size SDXL UNet call on CPU (256 px: latent 1x4x32x32, 77 text tokens of width 2048), cold and warm.

One variant is resident at a time (the fp32 UNet alone is 10.3 GB): each is loaded from the folder, quantized in
memory (``layer_specs`` / ``apply_specs`` + ``freeze``, from the checkpoint's own float16 weights, which the
quantizer reads in float32: the same codes as from a float32 load), its float parts cast, called once cold (the
first call after loading: page faults, allocator warm-up, cpu_int8's prepacking) and ``warm_calls`` times warm,
then freed before the next. W4A8 uses min-max weight ranges instead of the bundled recipe's MSE search (the
speed does not depend on how the ranges were chosen; the search costs minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from qdiff.bench.cpu import INT8, REF, Target, loadavg, ran_on, spied
from qdiff.bench.report import markdown_table
from qdiff.calib.metrics import sqnr_db
from qdiff.config.dtypes import dtype_kwargs
from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.eval.size import resident_bytes
from qdiff.models.adapters import get_adapter
from qdiff.quant.transform import apply_specs, layer_specs, quantized_layers

GIB = 2**30
MEMORY_POLL_S, MEMORY_WAIT_S = 60, 1200
# (label, bundled recipe or None, float parts dtype, GiB of free memory needed before loading)
VARIANTS: tuple[tuple[str, str | None, torch.dtype, float], ...] = (
    ("fp32", None, torch.float32, 14.0),
    ("bf16", None, torch.bfloat16, 8.0),
    ("W8A8", "w8a8", torch.float32, 9.0),
    ("W8A8", "w8a8", torch.bfloat16, 9.0),
    ("W4A8 g64 min-max", "w4a8", torch.float32, 9.0),
    ("W4A8 g64 min-max", "w4a8", torch.bfloat16, 9.0),
)


@dataclass(frozen=True)
class SdxlRow:
    variant: str
    parts: str
    backend: str
    load_s: float
    cold_s: float
    warm_s: float
    resident_gib: float
    sqnr_db: float | None  # output vs the fp32 UNet's
    twin: str
    load: str  # 1-minute load average after the warm calls (other jobs on the machine slow a variant down)


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("inf")


def wait_for_memory(need_gib: float) -> None:
    """Block until ``MemAvailable`` >= ``need_gib`` (other jobs share the machine): poll every minute, 20 at most."""
    start = time.monotonic()
    while (have := mem_available_gib()) < need_gib:
        if time.monotonic() - start > MEMORY_WAIT_S:
            raise QdiffError(f"--sdxl: {have:.1f} GiB of memory available after {MEMORY_WAIT_S // 60} minutes of "
                             f"waiting, {need_gib:g} GiB needed")  # fmt: skip
        print(f"qdiff bench cpu: {have:.1f} GiB available, waiting for {need_gib:g} GiB", file=sys.stderr)
        time.sleep(MEMORY_POLL_S)


def _release() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so the next variant finds them."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def unet_inputs(config, dtype: torch.dtype, pixels: int = 256) -> tuple[tuple, dict]:
    """(args, kwargs) of one SDXL UNet call at ``pixels`` px, batch 1 (no classifier-free guidance), seeded.

    Sizes from the UNet's config: for SDXL a latent (1, 4, 32, 32), 77 tokens of width 2048, text_embeds (1, 1280)
    (``projection_class_embeddings_input_dim`` minus 6 time ids of ``addition_time_embed_dim``), time_ids (1, 6).
    """
    g = torch.Generator().manual_seed(0)
    side = pixels // 8
    sample = torch.randn(1, config.in_channels, side, side, generator=g)
    text = torch.randn(1, 77, config.cross_attention_dim, generator=g)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32)
    added = {"text_embeds": torch.randn(1, pooled, generator=g).to(dtype), "time_ids": ids.to(dtype)}
    return (sample.to(dtype), torch.tensor(500)), {"encoder_hidden_states": text.to(dtype), "added_cond_kwargs": added}


def _load(folder: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **dtype_kwargs(dtype)).eval()
    except (OSError, ValueError) as exc:
        raise QdiffError(f"--sdxl {folder}: cannot load an SDXL UNet from its unet/ folder ({exc})") from exc


def _quantize(unet, recipe: Recipe) -> None:
    for m in apply_specs(unet, layer_specs(get_adapter(unet).layers(unet), recipe)).values():
        m.freeze()
        m.kernel = INT8


def _recipe(name: str) -> Recipe:
    recipe = Recipe.load(name)
    if recipe.weights.method != "minmax":
        recipe = dataclasses.replace(recipe, weights=dataclasses.replace(recipe.weights, method="minmax"))
    return recipe


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _call(unet, args: tuple, kwargs: dict) -> Tensor:
    return unet(*args, **kwargs).sample


def _variant(folder: str, label: str, recipe: str | None, dt: torch.dtype, warm_calls: int, ref_out: Tensor | None):
    t0 = time.perf_counter()
    unet = _load(folder, dt if recipe is None else torch.float16)  # quantized: the stored fp16, cast after
    if recipe is not None:
        _quantize(unet, _recipe(recipe))
        with _quiet_diffusers():  # its .to(dtype) warning about _keep_in_fp32_modules lists none here
            unet.to(dt)  # the float parts; codes stay integer and scales fp32 (QuantLayer._apply)
    load_s = time.perf_counter() - t0
    args, kwargs = unet_inputs(unet.config, dt)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out, counts = spied(partial(_call, unet, args, kwargs))
        cold = time.perf_counter() - t0
        warm = float("inf")
        for _ in range(warm_calls):
            t0 = time.perf_counter()
            unet(*args, **kwargs)
            warm = min(warm, time.perf_counter() - t0)
        load = loadavg()
        twin = ""
        if recipe is not None and INT8 in counts:
            for m in quantized_layers(unet).values():
                m.kernel = REF
            twin = "= reference twin" if torch.equal(out, unet(*args, **kwargs).sample) else "**DIFFERS**"
    facts = {"params": sum(p.numel() for p in unet.parameters()), "latent": tuple(args[0].shape),
             "text": tuple(kwargs["encoder_hidden_states"].shape),
             **{k: tuple(v.shape) for k, v in kwargs["added_cond_kwargs"].items()}}  # fmt: skip
    resident = resident_bytes(unet).in_memory  # a released layer: its prepacked copy, not its stored codes
    out = out.float()
    del unet
    _release()
    sq = None if ref_out is None else sqnr_db(ref_out, out)
    parts = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]
    name = label if recipe is None else f"{label} ({INT8})"
    row = SdxlRow(name, parts, ran_on(counts), load_s, cold, warm, resident / GIB, sq, twin, load)
    return row, out, facts


def sdxl_section(folder: str, warm_calls: int, use_int8: bool) -> tuple[str, list[Target]]:
    """Markdown section and the SDXL targets (warm call: W8A8 <= 0.8x bf16, W4A8 <= 1.0x bf16)."""
    if not (Path(folder) / "unet" / "config.json").is_file():
        raise QdiffError(f"--sdxl {folder}: no unet/config.json in that folder (a diffusers SDXL folder)")
    rows: list[SdxlRow] = []
    ref_out, facts = None, {}
    for label, recipe, dt, need in VARIANTS:
        if recipe is not None and not use_int8:
            continue
        wait_for_memory(need)
        row, out, seen = _variant(folder, label, recipe, dt, warm_calls, ref_out)
        facts = facts or seen
        ref_out = out if ref_out is None else ref_out
        rows.append(row)
        print(f"qdiff bench cpu: SDXL {row.variant}, {row.parts}: warm {row.warm_s:.2f} s", file=sys.stderr)
    return _render(rows, folder, warm_calls, facts), _targets(rows)


def fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _render(rows: list[SdxlRow], folder: str, warm_calls: int, facts: dict) -> str:
    bf16 = next(r.warm_s for r in rows if r.variant == "bf16")
    fp32 = next(r.warm_s for r in rows if r.variant == "fp32")
    table = [
        [r.variant, r.parts, r.backend, f"{r.load_s:.1f}", f"{r.cold_s:.2f}", f"{r.warm_s:.2f}",
         f"{r.warm_s / fp32:.2f}x", f"{r.warm_s / bf16:.2f}x", f"{r.resident_gib:.2f}",
         "—" if r.sqnr_db is None else f"{r.sqnr_db:.1f}", r.twin, r.load]
        for r in rows
    ]  # fmt: skip
    cols = ["variant", "float parts", "quantized layers ran on (spy)", "load + quantize s", "cold call s",
            "warm call s", "vs fp32", "vs bf16", "resident GiB", "SQNR vs fp32 dB", "output", "load avg"]  # fmt: skip
    intro = (
        "### Real-size SDXL UNet, one call at 256 px\n\n"
        f"`{folder}` ({facts['params']:,} parameters): latent {fmt(facts['latent'])}, text "
        f"{fmt(facts['text'])}, text_embeds {fmt(facts['text_embeds'])}, time_ids {fmt(facts['time_ids'])}. One "
        "variant resident at a time; cold = the first call after loading (and quantizing), warm = best of "
        f"{warm_calls} calls after it. W8A8 = bundled `w8a8`; W4A8 = bundled `w4a8` (int4 group 64) with min-max "
        "weight ranges instead of its MSE search (the speed does not depend on how the ranges were chosen). "
        "Quantized from the stored float16 weights. Resident = the UNet's tensors, with cpu_int8's prepacked int8 "
        "copy in place of each layer's released codes (`qdiff.eval.size.resident_bytes`). `= reference twin`: the "
        "cold output is `torch.equal` to the same UNet on the torch reference. "
        "load avg: the machine's 1-minute load average after the warm calls (above the core count, other jobs took "
        "CPU time from this variant)."
    )
    return intro + "\n\n" + markdown_table(cols, table)


def _targets(rows: list[SdxlRow]) -> list[Target]:
    bf16 = next(r.warm_s for r in rows if r.variant == "bf16")
    out = []
    for label, bound in (("W8A8", 0.8), ("W4A8", 1.0)):
        mine = [r for r in rows if r.variant.startswith(label)]
        best = min(mine, key=lambda r: r.warm_s) if mine else None
        what = f"SDXL UNet warm call {label} vs bf16" + (f" ({best.parts} float parts)" if best else "")
        out.append(Target(what, best.warm_s / bf16 if best else None, bound))
    return out
