"""Machine description, timing and Markdown tables for the benchmarks; results are written atomically."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qdiff.utils.machine import cpu_name
from qdiff.utils.perms import usual_mkstemp

# Dense INT8 tensor-core peak (TOPS) by device-name fragment, from the vendors' data sheets.
INT8_PEAK_TOPS: tuple[tuple[str, float], ...] = (
    ("H200", 1979.0),
    ("H100 PCIe", 1513.0),
    ("H100", 1979.0),  # SXM
    ("A100", 624.0),
    ("L40S", 733.0),
    ("RTX 4090", 660.6),
)


@dataclass(frozen=True)
class Machine:
    cpu: str
    gpu: str | None
    int8_peak_tops: float | None
    fp8: bool  # torch._scaled_mm with float8 needs compute capability >= 8.9
    interpreter: bool

    def header(self) -> str:
        lines = [
            f"- CPU: {self.cpu}",
            f"- GPU: {self.gpu or 'none'}"
            + (f" (dense INT8 peak {self.int8_peak_tops:g} TOPS)" if self.int8_peak_tops else ""),
            f"- torch {torch.__version__}, triton {_triton_version()}, Python {platform.python_version()}",
        ]
        if self.interpreter:
            lines.append(
                "- **Triton kernels ran in the CPU interpreter (TRITON_INTERPRET=1): correctness only; "
                "these timings are not performance.**"
            )
        return "\n".join(lines)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def machine(device: torch.device) -> Machine:
    gpu, peak, fp8 = None, None, False
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        peak = next((tops for key, tops in INT8_PEAK_TOPS if key in gpu), None)
        fp8 = torch.cuda.get_device_capability(device) >= (8, 9)
    interp = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return Machine(cpu=cpu_name(), gpu=gpu, int8_peak_tops=peak, fp8=fp8, interpreter=interp)


def time_us(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in microseconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def command_line() -> str:
    return "qdiff " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("qdiff") else " ".join(sys.argv)


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = usual_mkstemp(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
