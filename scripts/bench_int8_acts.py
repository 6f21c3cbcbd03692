"""Micro-timings behind qdiff/backends/int8_acts.py's design (one thread, best of N; run on an idle machine).

    python scripts/bench_int8_acts.py

Prints, in ms: the elementwise ops of the activation quantizer on a 2048 x 1280 activation (mixed bf16 / fp32
division vs fp32 / fp32, reductions over bf16 vs fp32, float -> uint8 vs int32 -> uint8 conversion), the whole
quantizer (``quantize_act``) on fp32 and bf16 input, the channels-last copy per sample vs one strided copy, and
uint8 im2col (``im2col_u8``) vs one 6-D gather copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from qdiff.backends.int8_acts import im2col_u8, quantize_act, to_channels_last


def best_ms(f: Callable[[], object], n: int = 20) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def gather_im2col(q: torch.Tensor) -> torch.Tensor:
    """The one-copy alternative: a 6-D strided gather of 3x3 windows (padding 1) in (C, kh, kw) column order."""
    q = torch.nn.functional.pad(q, (1, 1, 1, 1), value=128).contiguous()
    b, c, h, w = q.shape
    sb, sc, sy, sx = q.stride()
    win = q.as_strided((b, h - 2, w - 2, c, 3, 3), (sb, sy, sx, sc, sy, sx))
    return win.reshape(-1, c * 9)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    xb = (torch.randn(2048, 1280, generator=g) * 3).bfloat16()
    xf = xb.float()
    s = torch.rand(2048, 1, generator=g) + 0.5
    t = torch.div(xf, s)
    ti = (t.abs() + 12582912.0).view(torch.int32)
    rows = [
        ("div bf16 / fp32 (mixed dtypes)", lambda: torch.div(xb, s)),
        ("div fp32 / fp32", lambda: torch.div(xf, s)),
        ("amin + amax over bf16", lambda: (xb.amin(-1), xb.amax(-1))),
        ("amin + amax over fp32", lambda: (xf.amin(-1), xf.amax(-1))),
        ("bf16 -> fp32 cast", lambda: xb.float()),
        ("fp32 -> uint8", lambda: t.to(torch.uint8)),
        ("int32 -> uint8", lambda: ti.to(torch.uint8)),
        ("quantize_act, fp32 input", lambda: quantize_act(xf, 8, "dynamic", None, None)),
        ("quantize_act, bf16 input", lambda: quantize_act(xb, 8, "dynamic", None, None)),
    ]
    for shape in ((32, 64, 8, 8), (2, 320, 64, 64)):
        q = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        rows += [
            (f"to_channels_last uint8 {shape}", lambda q=q: to_channels_last(q)),
            (f".contiguous(channels_last) uint8 {shape}", lambda q=q: q.contiguous(memory_format=torch.channels_last)),
        ]
    q = torch.randint(0, 256, (2, 320, 64, 64), generator=g, dtype=torch.uint8)
    rows += [
        ("im2col_u8 3x3, 2x320x64x64", lambda: im2col_u8(q, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 128)),
        ("6-D gather copy 3x3, 2x320x64x64", lambda: gather_im2col(q)),
    ]
    print("| op | ms (best of 20, 1 thread) |\n|---|---|")
    for name, f in rows:
        print(f"| {name} | {best_ms(f):.2f} |")


if __name__ == "__main__":
    main()
