"""Calibration across torch.distributed ranks: the same artifacts as one process, for any number of ranks.

* **Capture** — each rank observes a batch-aligned shard of the calibration prompts (their own seeds, so the same
  activations as in one process) into :class:`TracedStats`; the shards are merged in prompt order by
  :func:`merge_stats`: per-step min / max / counts exactly, histograms by widening to the largest radius and adding
  (the pair merge the capture itself uses), and the EMA recomputed from the per-update ``(min, max)`` sequence in
  prompt order, which is exactly the fold one process does.
* **Sensitivity** — work items are ``(layer, kind, bits)`` candidates (a whole layer for ``proxy: gain``, whose
  candidates share one probe), balanced across ranks by cost (:func:`qdiff.distributed.shard.assign`: measured draw
  times in full mode, layer size in fast mode), each finished item appended to the rank's work log, scores gathered on
  rank 0 in item order. Rank 0 solves the ILP and every rank receives the plan.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qdiff.calib.capture import capture_stats
from qdiff.calib.sensitivity import _Scorer, analyzed_layers, candidates, fingerprint, metric_name, quantized_one
from qdiff.calib.stats import CapturedStats, LayerStats
from qdiff.calib.table import SensitivityTable
from qdiff.config.recipe import Recipe
from qdiff.distributed.env import Group
from qdiff.distributed.shard import assign, batch_shard
from qdiff.distributed.worklog import open_shared
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.sampling.draw import draw, prompt_seeds
from qdiff.sampling.prompts import load_prompts
from qdiff.utils.progress import progress_bar

WORKLOG = "worklog"  # sub-folder of the calibration work folder holding the per-rank sensitivity logs


class TracedStats(LayerStats):
    """:class:`LayerStats` that also keeps every update's ``(min, max)`` in arrival order (what the EMA folds)."""

    def __init__(self, bins: int = 1024, momentum: float = 0.95) -> None:
        super().__init__(bins, momentum)
        self.trace: list[tuple[float, float]] = []

    def update(self, x: Tensor, step: int = 0) -> None:
        before = self.num_updates
        super().update(x, step)
        if self.num_updates > before:  # the same reduction LayerStats.update folds into its EMA
            mn, mx = (float(v) for v in torch.aminmax(x.detach().float().reshape(-1)))
            self.trace.append((mn, mx))


def _widen(hist: Tensor, radius: float, target: float) -> Tensor:
    """``hist`` (steps, bins) over ``[-radius, radius]`` re-binned onto ``[-target, target]`` by pair merges."""
    if radius == 0.0:  # only zeros so far, counted in the middle bin: the same bin at every radius
        return hist.clone()
    bins, out = hist.shape[1], hist.clone()
    while radius < target:
        merged = out.reshape(out.shape[0], bins // 2, 2).sum(-1)
        out = torch.zeros_like(out)
        out[:, bins // 4 : bins // 4 + bins // 2] = merged
        radius *= 2.0
    return out


def merge_stats(parts: list[TracedStats]) -> LayerStats:
    """One layer's statistics over consecutive prompt shards given in prompt order, as one capture would record.

    Min / max / counts per step, ``numel_per_sample`` and ``num_updates`` are exact; the EMA is the sequential fold
    of the concatenated update traces (the order is the definition: shard 0's updates first); the histogram is the
    sum of the shards' histograms widened to the largest radius.
    """
    first = parts[0]
    out = LayerStats(first.bins, first.momentum)
    live = [p for p in parts if p.num_updates]
    if not live:
        return out
    steps = max(p.steps for p in live)
    out.step_min = [min((p.step_min[s] for p in live if s < p.steps), default=float("inf")) for s in range(steps)]
    out.step_max = [max((p.step_max[s] for p in live if s < p.steps), default=-float("inf")) for s in range(steps)]
    out.step_count = [sum(p.step_count[s] for p in live if s < p.steps) for s in range(steps)]
    out.radius = max(p.radius for p in live)
    out.hist = torch.zeros(steps, out.bins, dtype=torch.int64)
    for p in live:
        out.hist[: p.steps] += _widen(p.hist, p.radius, out.radius)
    m, ema = out.momentum, None
    for mn, mx in (v for p in live for v in p.trace):
        ema = (mn, mx) if ema is None else (m * ema[0] + (1 - m) * mn, m * ema[1] + (1 - m) * mx)
    out.ema = ema
    out.numel_per_sample = max(p.numel_per_sample for p in live)
    out.num_updates = sum(p.num_updates for p in live)
    return out


def capture_sharded(pipe, recipe: Recipe, group: Group, *, progress: bool = True) -> CapturedStats:
    """:func:`qdiff.calib.capture.capture_stats` over this rank's prompt shard, merged across ranks (every rank
    returns the merged statistics). Call on every rank inside a :meth:`~qdiff.distributed.env.Group.phase`."""
    cal = recipe.calibration
    prompts = list(load_prompts(cal.prompts, cal.num_prompts))
    seeds = prompt_seeds(recipe.sampler, len(prompts))
    mine = batch_shard(len(prompts), cal.batch_size, group.rank, group.world_size)
    part = None
    with group.phase("capture"):
        if len(mine):
            part = capture_stats(pipe, recipe, prompts=prompts[mine.start : mine.stop], make_stats=TracedStats,
                                 seeds=seeds[mine.start : mine.stop], progress=progress and group.is_main)  # fmt: skip
    parts = [p for p in group.all_gather(part) if p is not None]
    with group.phase("capture merge"):
        layers = {key: merge_stats([p.layers[key] for p in parts]) for key in parts[0].layers}
    return CapturedStats(layers, {**parts[0].meta, "prompts": prompts})


def _costs(scorer: _Scorer | None, items: list, recipe: Recipe, pipe) -> list[float]:
    """Estimated seconds per item: measured draw times in full mode (an SSIM item decodes images, an SQNR one
    stops at the latents), the layer's weight size in fast mode (local proxy) or one unit (denoiser passes)."""
    s = recipe.sensitivity
    if s.mode == "full":
        t0 = time.perf_counter()
        draw(pipe, scorer.prompts, None, recipe.sampler, scorer.bs, output_type="latent", keep=False)
        t_latent = time.perf_counter() - t0
        t0 = time.perf_counter()
        draw(pipe, scorer.prompts, None, recipe.sampler, scorer.bs)
        t_image = time.perf_counter() - t0
        return [t_image if metric_name(recipe, info) == "ssim" else t_latent for info, _, _ in items]
    if s.proxy == "local":
        return [1.0 + info.weight_numel / 1e6 for info, _, _ in items]
    return [1.0 for _ in items]


def analyze_sharded(
    pipe, recipe: Recipe, stats: CapturedStats, group: Group, *, work_dir: str | Path | None = None,
    progress: bool = True,
) -> SensitivityTable:  # fmt: skip
    """The sensitivity table of :func:`qdiff.calib.sensitivity.analyze`, its work items spread over the ranks.

    ``work_dir``: finished items are logged under ``work_dir/worklog`` and skipped on a rerun (any world size).
    Every rank returns the full table. Call on every rank.
    """
    t0 = time.perf_counter()
    _, den = find_denoiser(pipe)
    adapter = get_adapter(den)
    infos = analyzed_layers(adapter.layers(den), recipe)
    names = [i.name for i in infos]
    bos = set(adapter.cross_attention_kv(den)) & set(names) if recipe.bos_aware else set()
    s = recipe.sensitivity
    gain = s.mode == "fast" and s.proxy == "gain"
    items: list[tuple[Any, str | None, int | None]] = []
    for info in infos:
        items += [(info, None, None)] if gain else [(info, k, b) for k, b in candidates(info, recipe)]
    keys = [f"{info.name}|{'layer' if kind is None else f'{kind}{bits}'}" for info, kind, bits in items]
    header = {"stage": "sensitivity", "items": "layer" if gain else "candidate",
              **fingerprint(den, infos, recipe, bos)}  # fmt: skip
    log, done, scorer, measured = None, {}, None, []
    if work_dir is not None:
        log, done = open_shared(group, Path(work_dir) / WORKLOG, "sensitivity", header)
    todo = [i for i, k in enumerate(keys) if k not in done]
    with group.phase("sensitivity setup"):
        if todo:
            scorer = _Scorer(pipe, den, recipe, names, bos, progress and group.is_main)
            measured = _costs(scorer, [items[i] for i in todo], recipe, pipe) if group.is_main else []
    costs = group.broadcast(measured)
    t_setup = time.perf_counter() - t0
    mine = [todo[j] for j in assign(costs, group.world_size)[group.rank]] if todo else []
    results: dict[str, Any] = {}
    with group.phase("sensitivity"):
        bar = progress_bar(mine, desc=f"sensitivity ({s.mode}, {group.world_size} ranks)", unit="item",
                           enabled=progress and group.is_main)  # fmt: skip
        for i in bar:
            info, kind, bits = items[i]
            layer, st = den.get_submodule(info.name), stats.layers.get(info.name)
            if kind is None:
                value: Any = scorer.score_layer(info, layer, st, info.name in bos)
            else:
                with quantized_one(layer, kind, bits, recipe, st, info.name in bos):
                    value = scorer.score(info)
            value = json.loads(json.dumps(value))
            results[keys[i]] = value
            if log is not None:
                log.add(keys[i], value)
    parts = group.gather(results)
    table = None
    with group.phase("sensitivity table"):
        if group.is_main:
            values = dict(done)
            for part in parts:
                values.update(part)
            table = _table(recipe, infos, items, keys, values, stats)
            prompts = load_prompts(recipe.calibration.prompts, s.num_prompts if s.mode == "full" else s.fast_prompts)
            table.meta.update({"mode": s.mode, "proxy": s.proxy if s.mode == "fast" else None,
                               "prompts": prompts if todo else None, "resumed_items": len(done),
                               "resumed_rows": sum(all(k in done for k, (i, _, _) in zip(keys, items)
                                                       if i.name == info.name) for info in infos),
                               "bos_layers": sorted(bos), "setup_s": round(t_setup, 3),
                               "wall_s": round(time.perf_counter() - t0, 3), "ranks": group.world_size})  # fmt: skip
    return group.broadcast(table)


def _table(recipe, infos, items, keys, values: dict[str, Any], stats: CapturedStats) -> SensitivityTable:
    """Rows in layer order from the per-item scores (the row layout of :func:`~qdiff.calib.sensitivity.analyze`)."""
    missing = [k for k in keys if k not in values]
    if missing:
        raise RuntimeError(f"{len(missing)} sensitivity item(s) were scored by no rank, e.g. {missing[0]!r}")
    scores: dict[str, dict] = {info.name: {"w": {}, "a": {}} for info in infos}
    for (info, kind, bits), key in zip(items, keys):
        if kind is None:
            scores[info.name] = values[key]
        else:
            scores[info.name][kind][str(bits)] = values[key]
    rows = []
    for info in infos:
        st = stats.layers.get(info.name)
        row = {
            "name": info.name, "group": info.group, "kind": info.kind, "params": info.weight_numel,
            "act_numel": int(st.numel_per_sample) if st is not None else 0, "metric": metric_name(recipe, info),
            **scores[info.name],
        }  # fmt: skip
        rows.append(json.loads(json.dumps(row)))
    return SensitivityTable(rows, {})
