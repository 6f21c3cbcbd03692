"""Tile configurations (data) for qdiff's Triton kernels, and the host-side rule that picks one per shape.

Picked on the host, not by ``@triton.autotune``: the interpreter rejects more than one config, and a
fixed table keeps CPU tests and GPU runs on the same code path. ``qdiff bench kernels --sweep`` times
every GPU candidate on a card so this table can be re-tuned from measurements.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    """One launch configuration of a GEMM: block sizes, program-id swizzle group, warps, pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")

    def with_block_k(self, block_k: int) -> Tile:
        return Tile(self.block_m, self.block_n, block_k, self.group_m, self.num_warps, self.num_stages)


# Interpreter: run time grows with (number of programs) x (loop steps), so use large blocks
# (measured here: 128x256x256 took 1.5 s with 32^3 blocks, 0.06 s with 128x128x64).
INTERPRETER_TILE = Tile(128, 128, 64, group_m=4, num_warps=1, num_stages=1)

# GPU rules, from `qdiff bench kernels --sweep` on an NVIDIA H200 (triton 3.6, M=4096;
# docs/bench-kernels-H200-sweep.md).
# Tried in order: the first whose max_m / max_n bound the shape wins. W8A8: 128x128x128 with 8 warps was fastest
# or within 5% on every shape but N=640/1280 (where 64x128x128 / 128x128x64 with 4 warps won by <10%);
# W4A8 (in-kernel int4 unpack): 256x128x128 with 8 warps was fastest on every shape. M <= 64 is not measured.
GPU_RULES: tuple[tuple[int, int, Tile], ...] = (
    (64, 1 << 30, Tile(64, 128, 128, group_m=8, num_warps=4, num_stages=4)),  # few tokens (untuned)
    (1 << 30, 1280, Tile(128, 128, 64, group_m=8, num_warps=4, num_stages=4)),  # N <= 1280 (SDXL attention)
    (1 << 30, 1 << 30, Tile(128, 128, 128, group_m=8, num_warps=8, num_stages=3)),  # FF / FLUX layers
)
GPU_RULES_W4: tuple[tuple[int, int, Tile], ...] = (
    (64, 1 << 30, Tile(64, 128, 128, group_m=8, num_warps=4, num_stages=4)),  # few tokens (untuned)
    (1 << 30, 1 << 30, Tile(256, 128, 128, group_m=8, num_warps=8, num_stages=3)),
)
# Group-wise W4A8 (the sweep timed per-channel only): 128x256x128 measured 2.21 ms on FLUX FF g=128 and
# 256x128x128 2.57 ms, so group-wise keeps the wider-N tile.
GPU_RULES_W4_GROUP: tuple[tuple[int, int, Tile], ...] = (
    (64, 1 << 30, Tile(64, 128, 128, group_m=8, num_warps=4, num_stages=4)),  # few tokens (untuned)
    (1 << 30, 1 << 30, Tile(128, 256, 128, group_m=8, num_warps=8, num_stages=3)),
)

# Everything `--sweep` tries on a GPU.
GPU_SWEEP: tuple[Tile, ...] = (
    Tile(64, 128, 128, 8, 4, 4),
    Tile(128, 64, 128, 8, 4, 4),
    Tile(128, 128, 64, 8, 4, 4),
    Tile(128, 128, 128, 8, 4, 3),
    Tile(128, 128, 128, 8, 8, 3),
    Tile(128, 256, 64, 8, 8, 3),
    Tile(128, 256, 128, 8, 8, 3),
    Tile(256, 128, 128, 8, 8, 3),
)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fit_group(tile: Tile, group_size: int | None) -> Tile:
    """Shrink ``block_k`` so it divides the weight group (the kernel flushes one scale per group)."""
    if not group_size:
        return tile
    bk = tile.block_k
    while bk > 16 and group_size % bk:
        bk //= 2
    if group_size % bk:
        raise ValueError(f"group_size {group_size} must be a multiple of 16 for the Triton kernels")
    return tile.with_block_k(bk)


def pick_tile(m: int, n: int, group_size: int | None, interpreter: bool, packed4: bool = False) -> Tile:
    """Tile for an (M, K) x (N, K)^T GEMM (``packed4``: 4-bit weights, ``W_BITS=4``); ``block_k`` divides the group."""
    if interpreter:
        return fit_group(INTERPRETER_TILE, group_size)
    rules = (GPU_RULES_W4_GROUP if group_size else GPU_RULES_W4) if packed4 else GPU_RULES
    for max_m, max_n, tile in rules:
        if m <= max_m and n <= max_n:
            return fit_group(tile, group_size)
    return fit_group(rules[-1][2], group_size)
