"""Per-layer CPU timings of the exact int8 backend (qdiff/backends/cpu_int8.py) against fp32 / bf16 and the reference.

A thin wrapper: the benchmark is ``qdiff bench cpu --layers`` (qdiff/bench/cpu_layers.py), which times the frozen
qdiff layers users run (W8A8 dynamic / static, W4A8 g64 and its int4-resident unpack-per-call layout) in
interleaved rounds and reports the stored and prepacked weight bytes.

    python scripts/bench_cpu_int8.py            # all shapes, a few minutes on 2 cores
    python scripts/bench_cpu_int8.py --quick    # the smallest shapes only
"""

from __future__ import annotations

import sys

from qdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "cpu", "--layers", *sys.argv[1:]]))
