"""``qdiff eval``: compare pipelines (FP and quantized variants) on the same prompts and seeds.

Per variant: CLIP score and no-reference quality (bundled Shapes scorers or open_clip / pyiqa), attribute accuracy
and Shapes-FID for Shapes-domain prompts, SSIM / PSNR against the first variant's images (the reference, normally
the full-precision pipeline), measured denoiser and pipeline bytes, and seconds per image. Variants are added one
at a time (:meth:`Evaluator.add`), so the float pipeline can be scored and then quantized in place.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qdiff.calib.metrics import psnr, ssim
from qdiff.config.recipe import SamplerConfig
from qdiff.distributed.env import Group, current
from qdiff.distributed.shard import batch_shard
from qdiff.errors import QdiffError
from qdiff.sampling.draw import draw
from qdiff.utils.machine import cpu_name

AUTO = "auto"
SHAPES_SCORERS = ("shapes-clip", "shapes-quality")
GENERAL_SCORERS = ("open_clip:ViT-B-32:openai", "pyiqa:clipiqa")


@dataclass
class EvalResult:
    """Metrics per variant (insertion order; the first is the SSIM/PSNR reference), images and run facts."""

    metrics: dict[str, dict[str, float]]
    images: dict[str, Tensor]  # name -> (P, 3, H, W) in [0, 1]
    prompts: list[str]
    seeds: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        clean = {n: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
                 for n, m in self.metrics.items()}  # fmt: skip
        return {"metrics": clean, "prompts": self.prompts, "seeds": self.seeds, "meta": self.meta,
                "notes": self.notes}  # fmt: skip


def positive_count(name: str, value: object) -> None:
    """QdiffError unless ``value`` is an int >= 1 (``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise QdiffError(f"eval: {name} must be a positive integer, got {value!r}")


def _pipe_bytes(pipe) -> tuple[int, int]:
    """(denoiser bytes, bytes of every torch module of the pipeline), measured from the tensors."""
    from qdiff.eval.size import module_nbytes
    from qdiff.models.adapters import find_denoiser

    def measured(module: torch.nn.Module) -> int:  # an OpenVINO component: the weights its plugin was handed
        return module.weight_nbytes() if hasattr(module, "weight_nbytes") else module_nbytes(module)

    den = find_denoiser(pipe)[1]
    total = sum(measured(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    return measured(den), total


class Evaluator:
    """Draws ``prompts`` (seed ``seed + i`` for prompt ``i``) with each added pipeline and scores the images.

    ``clip`` / ``quality``: a scorer spec (``qdiff.sched.scorers``), ``"auto"`` (the bundled Shapes scorers for
    Shapes prompts, else open_clip ViT-B-32 / pyiqa clipiqa if their weights are on disk, else the metric is
    skipped with a note) or ``None`` to skip. ``shapes``: attribute accuracy and Shapes-FID (``None`` = when the
    prompts are Shapes captions).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        sampler: SamplerConfig,
        *,
        seed: int = 0,
        batch_size: int = 16,
        clip: str | None = AUTO,
        quality: str | None = AUTO,
        shapes: bool | None = None,
        progress: bool = True,
    ) -> None:
        from qdiff.eval.shapes import ShapesJudge, is_shapes_prompt_set

        if not prompts:
            raise QdiffError("eval: no prompts")
        positive_count("batch_size", batch_size)
        self.prompts = list(prompts)
        self.seeds = [seed + i for i in range(len(self.prompts))]
        self.sampler, self.batch_size, self.progress = sampler, batch_size, progress
        self.notes: list[str] = []
        domain = is_shapes_prompt_set(self.prompts)
        if shapes and not domain:
            raise QdiffError("eval: Shapes metrics need Shapes captions (each naming a shape and a colour)")
        self.judge = ShapesJudge(self.prompts, seed) if (domain if shapes is None else shapes) else None
        defaults = SHAPES_SCORERS if domain else GENERAL_SCORERS
        self.scorers = {key: self._scorer(key, spec, auto) for key, spec, auto in
                        (("clip_score", clip, defaults[0]), ("quality", quality, defaults[1]))}  # fmt: skip
        self.metrics: dict[str, dict[str, float]] = {}
        self.images: dict[str, Tensor] = {}

    def _scorer(self, key: str, spec: str | None, auto: str):
        from qdiff.sched.scorers import make_scorer

        if spec is None:
            return None
        if spec != AUTO:
            return make_scorer(spec)
        try:
            return make_scorer(auto)
        except QdiffError as exc:
            self.notes.append(f"{key} not measured: {exc}")
            return None

    def _score(self, images: Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, scorer in self.scorers.items():
            if scorer is not None:
                out[key] = float(scorer.score(images, self.prompts).mean())
        if self.judge is not None:
            out.update(self.judge(images))
        return out

    def add(self, name: str, pipe) -> dict[str, float]:
        """Draw and score the images of ``pipe`` under ``name``; returns its metrics."""
        if name in self.metrics:
            raise QdiffError(f"eval: variant name {name!r} used twice")
        group = current()
        with group.phase(f"eval {name}: warm-up"):
            draw(pipe, self.prompts[:1], self.seeds[:1], self.sampler, 1)  # not timed
        t0 = time.perf_counter()
        images = self._draw(pipe, name, group)
        seconds = (time.perf_counter() - t0) / len(self.prompts)  # wall time per image (all ranks together)
        m: dict[str, float] = {}
        with group.phase(f"eval {name}: scoring"):
            if images is not None:  # rank 0 scores everything
                den_bytes, total_bytes = _pipe_bytes(pipe)
                m = {"denoiser_mib": den_bytes / 2**20, "pipeline_mib": total_bytes / 2**20, "s_per_image": seconds}
                m.update(self._score(images))
                if self.images:
                    ref = next(iter(self.images.values()))
                    m["ssim"] = float(ssim(images, ref).mean())
                    m["psnr"] = psnr(images, ref)
                self.images[name] = images
        self.metrics[name] = m
        return m

    def _draw(self, pipe, name: str, group: Group) -> Tensor | None:
        """Every prompt's image, in prompt order, on rank 0 (``None`` on the other ranks).

        Under torchrun each rank draws a batch-aligned shard of the prompts (the same batches as one process, each
        prompt with its own seed), and rank 0 gathers the images.
        """
        mine = batch_shard(len(self.prompts), self.batch_size, group.rank, group.world_size)
        part = None
        with group.phase(f"eval {name}: drawing"):
            if len(mine):
                desc = f"eval {name}: {len(self.prompts)} images" if self.progress and group.is_main else None
                part = draw(pipe, self.prompts[mine.start : mine.stop], self.seeds[mine.start : mine.stop],
                            self.sampler, self.batch_size, desc=desc)  # fmt: skip
        parts = group.gather(part)
        return None if parts is None else torch.cat([p for p in parts if p is not None])

    def skip(self, name: str, reason: str) -> None:
        """A variant that could not run here: an empty row (shown as "-") and ``reason`` in the notes."""
        if name in self.metrics:
            raise QdiffError(f"eval: variant name {name!r} used twice")
        self.metrics[name] = {}
        self.notes.append(reason)

    def result(self, with_real: bool = True) -> EvalResult:
        """All variants so far; for Shapes prompts a ``real renders`` row (classifier ceiling, FID noise floor).

        Under torchrun only rank 0 holds images and metrics; the other ranks get an empty result."""
        if not current().is_main:
            return EvalResult({}, {}, self.prompts, self.seeds)
        metrics, images = dict(self.metrics), dict(self.images)
        if with_real and self.judge is not None:
            real = torch.from_numpy(self.judge.real).permute(0, 3, 1, 2).float() / 255.0
            images["real renders"] = real
            row = {k: v for k, v in self._score(real).items() if k != "shapes_fid"}
            row["shapes_fid"] = self.judge.reference()["shapes_fid"]
            metrics["real renders"] = row
        meta = {
            "reference": next(iter(self.metrics), None),
            "sampler": dataclasses.asdict(self.sampler),
            "scorers": {k: (s.name if s is not None else None) for k, s in self.scorers.items()},
            "shapes_metrics": self.judge is not None,
            "machine": f"{cpu_name()}, {torch.get_num_threads()} torch thread(s)"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_initialized() else ""),
            "torch": torch.__version__,
        }
        return EvalResult(metrics, images, self.prompts, self.seeds, meta, list(self.notes))


# ---- orchestration over model specs (what `qdiff eval` calls) --------------------------------------------------
SHAPES_MODEL = "builtin:shapes"


def spec_recipe(spec: str):
    """The recipe an export folder was made with (read from its manifest, no weights loaded), else ``None``."""
    from pathlib import Path

    from qdiff.config.recipe import Recipe
    from qdiff.engines.openvino import is_openvino_folder
    from qdiff.export.manifest import MANIFEST, read_manifest

    folder = Path(spec)
    if is_openvino_folder(folder):  # an OpenVINO folder carries its source export's recipe
        from qdiff.engines.openvino.runtime import read_ov_manifest

        data = read_ov_manifest(folder).get("recipe")
        return Recipe.from_dict(data) if isinstance(data, dict) else None
    if not (folder / MANIFEST).is_file():
        return None
    data = read_manifest(folder).get("recipe")
    return Recipe.from_dict(data) if data else None


def load_variant(spec: str):
    """A variant's pipeline: an OpenVINO folder (``qdiff export-openvino``) runs on OpenVINO, anything else is
    :func:`qdiff.export.resolve.load_pipeline`."""

    from qdiff.engines.openvino import is_openvino_folder
    from qdiff.export.resolve import load_pipeline

    if is_openvino_folder(spec):
        from qdiff.engines.openvino.runtime import load_openvino

        return load_openvino(spec)
    return load_pipeline(spec)


def default_setup(specs: Sequence[str]) -> tuple[SamplerConfig, str]:
    """(sampler, prompt set) for comparing ``specs``: the first export's recipe sampler, else the bundled Shapes
    recipe's for ``builtin:shapes``, else the recipe defaults; Shapes held-out prompts for the Shapes model."""
    from qdiff.config.recipe import Recipe

    recipes = [r for r in (spec_recipe(s) for s in specs) if r is not None]
    if not recipes and SHAPES_MODEL in specs:
        recipes = [Recipe.load("shapes-w8a8")]
    sampler = recipes[0].sampler if recipes else SamplerConfig()
    shapes = SHAPES_MODEL in specs or any(r.model == SHAPES_MODEL for r in recipes)
    return sampler, ("shapes-heldout" if shapes else "coco")


def variant_name(pipe, taken: Sequence[str]) -> str:
    """``FP`` for a float pipeline, else its recipe name (``+qsched`` with a fitted schedule, `` @openvino`` when
    another engine runs it); made unique."""
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.transform import get_info
    from qdiff.sched.qsched import get_schedule

    den = find_denoiser(pipe)[1]
    info = get_info(den)
    name = "FP" if info is None else info.recipe.name + ("+qsched" if get_schedule(pipe) is not None else "")
    if getattr(den, "engine", None):  # the same export run by another engine is another variant
        name += f" @{den.engine}"
    base, i = name, 2
    while name in taken:
        name, i = f"{base} ({i})", i + 1
    return name


def evaluate(
    models: Sequence[str],
    *,
    prompts: str | Sequence[str] | None = None,
    num_prompts: int = 64,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
    batch_size: int = 16,
    clip: str | None = AUTO,
    quality: str | None = AUTO,
    device: str = "cpu",
    dtype: str | None = None,
    peers: str | Sequence[str] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Load each model spec in turn (export folder, diffusers folder, hub id in the cache, ``builtin:NAME``),
    draw the same prompts and seeds with one sampler, and score them (see :class:`Evaluator`).

    ``dtype``: compute dtype of every variant's float parts (:func:`qdiff.export.resolve.place`; default on CPU:
    float32, bfloat16 for float16 models on CPUs with native bf16). ``peers``: names from
    :data:`qdiff.eval.peers.PEERS` (or ``"all"``), built from the first model (a float pipeline) and scored after the
    models (bitsandbytes, optimum-quanto, torchao: the ``qdiff[peers]`` extra)."""
    from qdiff.export.resolve import place
    from qdiff.sampling.prompts import load_prompts

    if not models:
        raise QdiffError("eval: give at least one model")
    positive_count("num_prompts", num_prompts)
    positive_count("batch_size", batch_size)
    if peers:  # validated before any model is loaded
        from qdiff.eval.peers import parse_peers

        peers = parse_peers(peers)
    default_sampler, default_prompts = default_setup(models)
    if prompts is None or isinstance(prompts, str):
        prompts = load_prompts(prompts or default_prompts, num_prompts)
    ev = Evaluator(list(prompts)[:num_prompts], sampler or default_sampler, seed=seed, batch_size=batch_size,
                   clip=clip, quality=quality, progress=progress)  # fmt: skip
    for spec in models:
        pipe = load_variant(spec)
        place(pipe, device, dtype)
        ev.add(variant_name(pipe, list(ev.metrics)), pipe)
        del pipe
    if peers:
        from qdiff.eval.peers import add_peers, peer_recipe

        add_peers(ev, models[0], peers, peer_recipe(models), device=device, dtype=dtype)
    return ev.result()
