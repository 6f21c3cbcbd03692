"""Fit Q-Sched on a quantized pipeline: draw images with candidate schedules, score them, search.

Only the pipeline handed in is ever sampled (the quantized one); there is no full-precision model
anywhere in this path, which ``tests/sched/test_reference_free.py`` checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from qdiff.config.recipe import Recipe, SamplerConfig
from qdiff.errors import QdiffError
from qdiff.sampling.draw import draw, sampler_kwargs
from qdiff.sampling.prompts import load_prompts
from qdiff.sched.decision import ValidationGrid
from qdiff.sched.families import EMBEDDING, label_table, stratified_split
from qdiff.sched.family_fit import fit_families
from qdiff.sched.features import FeatureExtractor, make_features
from qdiff.sched.fit import EvalCache, FitResult
from qdiff.sched.guard import ANCHOR_SPLIT, REFERENCE_SPLIT, fit_guarded
from qdiff.sched.qsched import Schedule, apply_schedule, get_schedule
from qdiff.sched.scorers import Scorer, make_scorer

HELDOUT_SEED_OFFSET = 10_000
REFERENCE_SEED_OFFSET = 20_000  # the validation guard's second un-scheduled draw of the held-out prompts


def render(pipe, schedule: Schedule | None, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig,
           batch_size: int) -> Tensor:  # fmt: skip
    """Images (P, 3, H, W) in [0, 1], one per prompt with its own seed, drawn with ``schedule`` installed."""
    apply_schedule(pipe, schedule, strict=True)  # a candidate must run at its own step count
    return draw(pipe, prompts, seeds, sampler, batch_size)


def denoiser_fingerprint(pipe) -> str:
    """sha256 over the denoiser's tensors (names, shapes, dtypes, bytes): which model drew the images."""
    from qdiff.models.adapters import find_denoiser

    h = hashlib.sha256()
    for name, t in find_denoiser(pipe)[1].state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def prompt_pool(recipe: Recipe, prompts: Sequence[str] | str | Path | None) -> list[str]:
    """The Q-Sched prompt source (given prompts, a prompt file/name, or the recipe's), checked to hold
    ``num_prompts + heldout_prompts`` prompts."""
    cfg = recipe.qsched
    if prompts is None or isinstance(prompts, (str, Path)):
        prompts = load_prompts(prompts or cfg.prompts or recipe.calibration.prompts)
    pool = list(prompts)
    if len(pool) < cfg.num_prompts + cfg.heldout_prompts:
        raise QdiffError(f"recipe: qsched.num_prompts: {cfg.num_prompts} fitting + {cfg.heldout_prompts} held-out "
                         f"prompts needed, only {len(pool)} given")  # fmt: skip
    return pool


def split_prompts(recipe: Recipe, prompts: Sequence[str] | str | Path | None) -> tuple[list[str], list[str]]:
    """(fitting prompts, held-out prompts): the first ``num_prompts`` and the next ``heldout_prompts``."""
    pool, n = prompt_pool(recipe, prompts), recipe.qsched.num_prompts
    return pool[:n], pool[n : n + recipe.qsched.heldout_prompts]


def family_split(pipe, recipe: Recipe, prompts: Sequence[str] | str | Path | None):
    """(fitting prompts, validation prompts, the fitting prompts' family labels, validation grid): drawn from the
    prompt source stratified over every family of the ``qsched.families`` attributes."""
    cfg, pool = recipe.qsched, prompt_pool(recipe, prompts)
    embed = text_embeddings(pipe, pool) if EMBEDDING in cfg.families else None
    labels = label_table(pool, cfg.families, embed, cfg.family_clusters, cfg.seed)
    fit_idx, val_idx = stratified_split(labels, cfg.families, (cfg.num_prompts, cfg.heldout_prompts), cfg.seed)
    grid = ValidationGrid.build([labels[i] for i in val_idx], cfg.families, cfg.validation_seeds)
    return [pool[i] for i in fit_idx], [pool[i] for i in val_idx], [labels[i] for i in fit_idx], grid


@torch.no_grad()
def text_embeddings(pipe, prompts: Sequence[str]) -> Tensor:
    """(P, D) prompt embeddings from the pipeline's own text encoder: its last hidden states, mean over tokens."""
    tok, enc = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if tok is None or enc is None:
        raise QdiffError("prompt families by embedding: the pipeline has no tokenizer/text_encoder")
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")  # fmt: skip
    mask = ids.attention_mask.to(enc.device)
    hidden = enc(ids.input_ids.to(enc.device), attention_mask=mask)[0].double()
    return ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu()


def fit_pipeline(
    pipe,
    recipe: Recipe,
    prompts: Sequence[str] | str | Path | None = None,
    *,
    alignment: str | Scorer | None = None,
    quality: str | Scorer | None = None,
    features: str | FeatureExtractor | None = None,
    log: str | Path | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit ``recipe.qsched`` on ``pipe`` and install the result (identity = no wrapper) on ``pipe.scheduler``.

    With ``qsched.features`` set (or ``features``), image features are recorded with every evaluation for the
    distribution anchor and the validation guard (``qdiff.sched.guard``); ``FitResult.report`` holds the
    validation-split metrics of identity and of every searched schedule.
    """
    cfg, sampler = recipe.qsched, recipe.sampler
    grid = fit_labels = None
    if cfg.families:  # stratified over prompt families, validated per family (qdiff.sched.family_fit)
        fit_prompts, held_prompts, fit_labels, grid = family_split(pipe, recipe, prompts)
    else:
        fit_prompts, held_prompts = split_prompts(recipe, prompts)
    align = make_scorer(alignment if alignment is not None else cfg.alignment)
    qual = make_scorer(quality if quality is not None else cfg.quality)
    feat_spec = features if features is not None else cfg.features
    feat = None if isinstance(feat_spec, str) and feat_spec == "none" else make_features(feat_spec)
    if feat is not None and cfg.features == "none":
        cfg = dataclasses.replace(cfg, features=feat.name)
    reps = cfg.validation_seeds if grid is not None else 1  # validation image j * V + i: prompt i, seed slot j
    seeds = {
        "fit": [cfg.seed + i for i in range(len(fit_prompts))],
        "heldout": [cfg.seed + HELDOUT_SEED_OFFSET + i for i in range(len(held_prompts) * reps)],
        REFERENCE_SPLIT: [cfg.seed + REFERENCE_SEED_OFFSET + i for i in range(len(held_prompts) * reps)],
    }
    held_prompts = held_prompts * reps
    texts = {"fit": fit_prompts, "heldout": held_prompts, REFERENCE_SPLIT: held_prompts, ANCHOR_SPLIT: fit_prompts}
    seeds[ANCHOR_SPLIT] = seeds["fit"]
    previous = get_schedule(pipe)

    def evaluate(schedule: Schedule, split: str) -> tuple[Tensor, ...]:
        if split in (REFERENCE_SPLIT, ANCHOR_SPLIT) and cfg.reference_steps:  # the plain sampler at other steps
            ref = dataclasses.replace(sampler, steps=cfg.reference_steps)
            images = render(pipe, None, texts[split], seeds[split], ref, recipe.calibration.batch_size)
        else:
            images = render(pipe, schedule, texts[split], seeds[split], sampler, recipe.calibration.batch_size)
        scores = align.score(images, texts[split]), qual.score(images, texts[split])
        return scores if feat is None else (*scores, feat.features(images))

    fingerprint = {
        "denoiser": denoiser_fingerprint(pipe) if log is not None else None,
        "scheduler": type(getattr(pipe.scheduler, "inner", pipe.scheduler)).__name__,
        "sampler": sampler_kwargs(sampler), "prompts": {k: texts[k] for k in ("fit", "heldout")},
        "seeds": {k: seeds[k] for k in ("fit", "heldout")},  # the reference split derives from the same seed
        "alignment": align.name, "quality": qual.name,
    }  # fmt: skip
    if feat is not None:  # logs written without features stay valid for fits that use none
        fingerprint["features"] = feat.name
    if cfg.reference_steps:
        fingerprint["reference_steps"] = cfg.reference_steps
    try:
        if grid is not None:
            cache = EvalCache(log, fingerprint)
            result = fit_families(evaluate, cfg, sampler.steps, fit_labels, grid, cache, progress)
        else:
            result = fit_guarded(evaluate, cfg, sampler.steps, len(fit_prompts), len(held_prompts),
                                 EvalCache(log, fingerprint), progress)  # fmt: skip
    except BaseException:
        apply_schedule(pipe, previous)
        raise
    if result.accepted:  # provenance for the manifest: the search settings and the scorers behind the numbers
        meta = {**result.schedule.meta, "qsched": dataclasses.asdict(cfg), "scorers": [align.name, qual.name],
                "prompts": {"fit": len(fit_prompts), "heldout": len(held_prompts)}}  # fmt: skip
        result = dataclasses.replace(result, schedule=Schedule(result.schedule.c_eps, result.schedule.c_x, meta))
    apply_schedule(pipe, result.schedule if result.accepted else None)
    return result
