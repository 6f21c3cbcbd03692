"""The calibration pipeline: capture -> sensitivity -> allocation, each stage saved so a run can resume.

Folder layout (``qdiff calibrate --out DIR``)::

    DIR/ranges.safetensors, ranges.json   per-layer, per-step activation statistics (capture)
         sensitivity.jsonl                 journal: one line per finished layer (resume point)
         sensitivity.json, sensitivity.csv table, one row per layer
         sensitivity.png                   heatmap (plan bits outlined)
         plan.json                         the allocator's Plan (``qdiff quantize --calib DIR``)
         recipe.yaml, calibrate.log        the recipe used and a log of the run
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qdiff.calib.allocate import allocate, items_from_table
from qdiff.calib.capture import capture_stats
from qdiff.calib.offload import check_weights, is_offloaded, offloaded
from qdiff.calib.sensitivity import analyze
from qdiff.calib.stats import STATS_JSON, CapturedStats, write_text_atomic
from qdiff.calib.table import SensitivityTable
from qdiff.config.plan import Plan
from qdiff.config.recipe import Recipe
from qdiff.distributed.env import Group, current
from qdiff.errors import QdiffError
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.models.schedulers import apply_sampler_scheduler

JOURNAL = "sensitivity.jsonl"


@dataclass
class CalibrationResult:
    """Artifacts of :func:`calibrate`: captured ranges, the sensitivity table and the plan."""

    recipe: Recipe
    stats: CapturedStats
    table: SensitivityTable
    plan: Plan
    log: list[str]

    def save(self, folder: str | Path) -> Path:
        """Write every artifact into ``folder`` (each file atomically)."""
        from qdiff.calib.plot import save_png

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / STATS_JSON).exists():
            self.stats.save(folder)
        self.table.save_json(folder / "sensitivity.json")
        self.table.save_csv(folder / "sensitivity.csv")
        save_png(self.table, folder / "sensitivity.png", self.plan, f"{self.recipe.name}: sensitivity per layer")
        write_text_atomic(folder / "plan.json", _plan_json(self.plan))
        write_text_atomic(folder / "recipe.yaml", self.recipe.to_yaml())
        write_text_atomic(folder / "calibrate.log", "\n".join(self.log) + "\n")
        return folder


def _plan_json(plan: Plan) -> str:
    import json

    return json.dumps(plan.to_dict(), indent=2) + "\n"


def calibrate(
    pipe,
    recipe: Recipe,
    *,
    work_dir: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    group: Group | None = None,
) -> CalibrationResult:
    """Run capture, sensitivity and allocation on ``pipe`` (left in floating point).

    With ``work_dir`` every stage is saved there as it finishes and reused on the next call: the captured
    ranges are loaded instead of recomputed, and the sensitivity journal resumes at the first missing layer.
    ``group`` (default: :func:`qdiff.distributed.env.current`): with several ranks (torchrun) the prompts and
    sensitivity items are sharded (:mod:`qdiff.calib.sharded`), rank 0 writes ``work_dir`` and every rank returns
    the result.
    """
    group = group or current()
    if recipe.calibration.offload != "none" and not is_offloaded(pipe):  # qdiff.calib.offload; restored on exit
        if group.distributed:
            raise QdiffError("calibration.offload is not supported under torchrun; run one process, or shard only")
        with offloaded(pipe, recipe.calibration.offload, None if work_dir is None else Path(work_dir).parent):
            return calibrate(pipe, recipe, work_dir=work_dir, progress=progress, echo=echo, group=group)
    if group.distributed:
        progress = progress and group.is_main
    log: list[str] = []

    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        log.append(line)
        if echo is not None and group.is_main:
            echo(line)

    work = Path(work_dir) if work_dir is not None else None
    _, den = find_denoiser(pipe)
    check_weights(den)  # NaN / Inf weights: refused before any sampling (offloaded blocks one at a time)
    adapter = get_adapter(den)
    if apply_sampler_scheduler(pipe, recipe.sampler):
        say(f"scheduler: {type(pipe.scheduler).__name__} (recipe sampler.scheduler)")
    say(f"recipe {recipe.name}: sensitivity {recipe.sensitivity.mode}, budget W{recipe.allocation.w_budget:g}"
        f"A{recipe.allocation.a_budget:g}, joint={recipe.allocation.joint}, bos_aware={recipe.bos_aware}")  # fmt: skip
    t = time.perf_counter()
    if group.distributed:
        stats, table = _sharded_stages(pipe, recipe, work, group, progress, say)
    elif work is not None and (work / STATS_JSON).exists():
        stats = CapturedStats.load(work)
        say(f"capture: loaded {len(stats.layers)} layers from {work}")
    else:
        stats = capture_stats(pipe, recipe, progress=progress)
        if work is not None:
            stats.save(work)
        say(
            f"capture: {len(stats.layers)} layers, {len(stats.meta['prompts'])} prompts "
            f"({time.perf_counter() - t:.1f} s)"
        )
    if not group.distributed:
        t = time.perf_counter()
        journal = None if work is None else work / JOURNAL
        table = analyze(pipe, recipe, stats=stats, journal=journal, progress=progress)
        say(
            f"sensitivity: {len(table.rows)} layers, {table.meta['resumed_rows']} resumed "
            f"({time.perf_counter() - t:.1f} s)"
        )
    alloc = recipe.allocation
    plan = None
    with group.phase("allocation"):  # rank 0 solves the ILP; the others receive its plan
        if group.is_main:
            items = items_from_table(table.rows, recipe.sensitivity.a_bits)
            plan = allocate(items, alloc.w_budget, alloc.a_budget, joint=alloc.joint,
                            content_weight=alloc.content_weight)  # fmt: skip
    if group.distributed:
        plan = Plan.from_dict(group.broadcast(plan.to_dict() if group.is_main else None))
    meta = dict(plan.meta)
    meta.update({"recipe": recipe.name, "sensitivity_mode": recipe.sensitivity.mode, "family": adapter.family})
    plan = Plan(plan.layers, meta)
    say(
        f"allocation: W {meta['achieved_w_bits']:.4f} / {alloc.w_budget:g} bits, "
        f"A {meta['achieved_a_bits']:.4f} / {alloc.a_budget:g} bits, "
        f"status {meta['solver_status']} ({meta['solve_s']} s)"
    )
    return CalibrationResult(recipe, stats, table, plan, log)


def _sharded_stages(pipe, recipe: Recipe, work: Path | None, group: Group, progress: bool, say):
    """Capture (or the ranges saved by an earlier run, read by rank 0) and sensitivity across the ranks."""
    from qdiff.calib.sharded import analyze_sharded, capture_sharded

    t = time.perf_counter()
    stats = None
    with group.phase("capture (saved ranges)"):
        if group.is_main and work is not None and (work / STATS_JSON).exists():
            stats = CapturedStats.load(work)
    stats = group.broadcast(stats)
    if stats is not None:
        say(f"capture: loaded {len(stats.layers)} layers from {work}")
    else:
        stats = capture_sharded(pipe, recipe, group, progress=progress)
        with group.phase("capture (save)"):
            if work is not None and group.is_main:
                stats.save(work)
        say(f"capture: {len(stats.layers)} layers, {len(stats.meta['prompts'])} prompts on {group.world_size} ranks "
            f"({time.perf_counter() - t:.1f} s)")  # fmt: skip
    t = time.perf_counter()
    table = analyze_sharded(pipe, recipe, stats, group, work_dir=work, progress=progress)
    say(f"sensitivity: {len(table.rows)} layers, {table.meta['resumed_items']} items resumed, "
        f"{group.world_size} ranks ({time.perf_counter() - t:.1f} s)")  # fmt: skip
    return stats, table


def calibrate_to_folder(
    pipe, recipe: Recipe, out: str | Path, *, overwrite: bool = False, progress: bool = True, echo=print
) -> CalibrationResult:
    """``qdiff calibrate``: work in ``OUT.partial`` (kept on failure, resumed by the next run), then rename.

    The folder appears complete or not at all; an interrupted run leaves ``OUT.partial`` with the captured
    ranges and the sensitivity journal, and running the same command again continues from there. Under torchrun
    rank 0 writes and renames the folder once every rank has finished (a failure on any rank leaves no ``OUT``).
    """
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    group = current()
    if work.exists() and group.is_main:
        echo(f"resuming from {work}")
    result = calibrate(pipe, recipe, work_dir=work, progress=progress, echo=echo, group=group)
    with group.phase("write"):
        if group.is_main:
            _publish(result, work, out, overwrite)
    return result


def _publish(result: CalibrationResult, work: Path, out: Path, overwrite: bool) -> None:
    """Save ``result`` into ``work`` and rename it to ``out`` (replacing ``out`` only with ``overwrite``)."""
    import os
    import shutil
    import tempfile

    result.save(work)
    if out.exists():
        if not overwrite:  # checked before any work too; re-checked in case it appeared meanwhile
            from qdiff.errors import QdiffError

            raise QdiffError(f"output folder {out} already exists (use --overwrite to replace it)")
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(work, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, out)
