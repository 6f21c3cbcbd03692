"""``qdiff bench cpu``: the int8 CPU backend against fp32 and bf16, per layer and per pipeline (issue 16).

Ratios come from one run, side by side: every variant of a table is timed once per round and the rounds are
interleaved (a noisy neighbour on a shared machine hits all of them alike); a table keeps each variant's best
round. The real-size SDXL UNet is the exception: one variant is resident at a time (memory), so its warm time is
the best of consecutive calls. The work is in :mod:`qdiff.bench.cpu_layers` (single layers),
:mod:`qdiff.bench.cpu_pipeline` (the Shapes pipeline) and :mod:`qdiff.bench.cpu_sdxl` (one SDXL UNet call).
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qdiff.backends.registry import REGISTRY, recording
from qdiff.utils.machine import cpu_flags, cpu_name

# /proc/cpuinfo flags that decide which CPU kernels are fast and exact (int8 dot products, bf16 matmuls)
FLAGS = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
INT8 = "cpu_int8"  # the backend under test
REF = "torch"  # the exact reference backend


@dataclass(frozen=True)
class Target:
    """One "done when" line of the issue: ``what`` must be ``<=`` (or ``>=``) ``bound`` (a ratio)."""

    what: str
    ratio: float | None  # measured; None when not run
    bound: float
    at_most: bool = True

    def row(self) -> list[str]:
        sign = "<=" if self.at_most else ">="
        if self.ratio is None:
            return [self.what, f"{sign} {self.bound:g}x", "—", "not run"]
        met = self.ratio <= self.bound if self.at_most else self.ratio >= self.bound
        return [self.what, f"{sign} {self.bound:g}x", f"{self.ratio:.2f}x", "met" if met else "**missed**"]


def gate() -> tuple[bool, list[tuple[str, str]]]:
    """(cpu_int8 usable here, ``REGISTRY.describe("cpu")``): runs the exactness gate once per process."""
    described = REGISTRY.describe("cpu")
    return REGISTRY.backend(INT8)[0] is not None, described


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def header(described: list[tuple[str, str]], command: str) -> str:
    """Machine, flags, threads, versions, the backends' verdicts and the command line, as Markdown bullets."""
    flags = cpu_flags()
    have = ", ".join(f for f in FLAGS if f in flags) or "none of them"
    missing = ", ".join(f for f in FLAGS if f not in flags)
    lines = [
        f"- CPU: {cpu_name()}; flags: {have}" + (f" (absent: {missing})" if missing else ""),
        f"- {os.cpu_count()} cores visible, torch {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"oneDNN {'yes' if torch.backends.mkldnn.is_available() else 'no'}, Python {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}; load average at start {loadavg()} (other jobs share the cores)",
        "- backends on cpu: " + "; ".join(f"`{name}` {status}" for name, status in described),
        f"- command: `{command}`",
    ]
    return "\n".join(lines)


def spied(fn: Callable[[], object]) -> tuple[object, dict[str, int]]:
    """``fn()`` under the backend spy: (its result, {backend name: frozen calls}) in first-seen order."""
    with recording() as calls:
        out = fn()
    counts: dict[str, int] = {}
    for backend, _op in calls:
        counts[backend] = counts.get(backend, 0) + 1
    return out, counts


def ran_on(counts: dict[str, int]) -> str:
    """``cpu_int8 ×120, torch ×4`` (empty counts: the float path, no frozen layer)."""
    return ", ".join(f"{b} ×{n}" for b, n in counts.items()) or "float"


def best_of_rounds(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    *,
    budget_s: float = 0.0,
    max_rounds: int = 50,
    capped: dict[str, int] | None = None,
) -> tuple[dict[str, float], int]:
    """Best wall time (s) per variant over interleaved rounds; (times, rounds run). Warm the variants up first.

    At least ``rounds`` rounds, more (up to ``max_rounds``) while the whole run stays within ``budget_s``: on a
    shared machine a round often loses a time slice, and only the best of many is the code's speed. ``capped``:
    variant -> most rounds it takes part in (the slow reference).
    """
    best = {name: float("inf") for name in fns}
    capped = capped or {}
    start, r = time.perf_counter(), 0
    while r < rounds or (r < max_rounds and time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            if r >= capped.get(name, max_rounds):
                continue
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        r += 1
    return best, r


def run_cpu_bench(
    *,
    layers: bool = True,
    pipeline: bool = True,
    sdxl: str | None = None,
    rounds: int = 5,
    quick: bool = False,
    threads: int | None = None,
    openvino: bool = False,
    mixdq_plan: str | None = None,
) -> str:
    """The Markdown report of ``qdiff bench cpu`` (section "## CPU (issue 16)"); ``threads``: torch's thread count
    for the run (None: leave it)."""
    if threads is not None:
        torch.set_num_threads(threads)
    ok, described = gate()
    flags = [f for f, on in (("--layers", layers), ("--pipeline", pipeline), ("--engine openvino", openvino),
                             ("--quick", quick)) if on]  # fmt: skip
    extra = [*(["--sdxl", sdxl] if sdxl else []), *(["--mixdq-plan", mixdq_plan] if mixdq_plan else []),
             f"--rounds {rounds}", *([f"--threads {threads}"] if threads else [])]  # fmt: skip
    command = " ".join(["qdiff bench cpu", *flags, *extra])
    parts = ["## CPU (issue 16)", "", header(described, command), ""]
    targets: list[Target] = []
    if not ok:
        parts += [f"**`{INT8}` is off on this machine, so the int8 rows are skipped** (see the backends line).", ""]
    if layers:
        from qdiff.bench.cpu_layers import layer_section

        text, found = layer_section(rounds, quick, ok)
        parts += [text, ""]
        targets += found
    if pipeline:
        from qdiff.bench.cpu_pipeline import shapes_section

        text, found = shapes_section(rounds, quick, ok)
        parts += [text, ""]
        targets += found
    if openvino:
        from qdiff.bench.cpu_openvino import openvino_section

        parts += [openvino_section(rounds, quick, mixdq_plan), ""]
    if sdxl:
        from qdiff.bench.cpu_sdxl import sdxl_section

        text, found = sdxl_section(sdxl, max(1, min(rounds, 3)) if not quick else 1, ok)
        parts += [text, ""]
        targets += found
    if targets:
        from qdiff.bench.report import markdown_table

        rows = [t.row() for t in targets]
        parts += ['### Targets (issue 16, "done when")', "", markdown_table(["target", "bound", "measured", ""], rows)]
        parts.append("")
    parts.append(f"Load average at the end: {loadavg()}.")
    return "\n".join(parts) + "\n"
