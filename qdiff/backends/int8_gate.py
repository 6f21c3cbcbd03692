"""Exactness gate of the CPU int8 kernels: run once per process before choosing the ``cpu_int8`` backend.

The oneDNN / ``torch._int_mm`` int8 paths are only exact where the CPU has VNNI (or AMX): the AVX2 / AVX-512 (no
VNNI) code paths sum pairs of u8*s8 products in saturating int16 and are wrong for full-range int8 codes.
:func:`self_test` runs every kernel the backend uses on worst-case codes against float64 integer matmuls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qdiff.backends.onednn import (
    int8_gemm,
    onednn_available,
    packed_matmul,
    prepack_conv,
    prepack_linear,
    qconv,
    qlinear,
)

__all__ = ["self_test", "GATE_K"]

GATE_K = 23040  # the largest K of the supported models: SDXL's 3x3 convs over 2560 channels


def _gate_cases(k: int, w_max: int, gen: torch.Generator) -> list[tuple[str, Tensor, Tensor, int]]:
    """(name, activation codes int8 (M, K), weight codes int8 (N, K), zero-point) worst cases for the GEMM.

    Two shapes only, (33, K) x (40, K) and a single row (1, K) x (24, K) (kernels differ for M=1): every new shape
    costs oneDNN a kernel generation.
    """

    def full(m: int, v: int) -> Tensor:
        return torch.full((m, k), v, dtype=torch.int8)

    def signs(m: int, mag: int) -> Tensor:
        return (torch.randint(0, 2, (m, k), generator=gen, dtype=torch.int8) * 2 - 1) * mag

    alt = torch.tensor([127, -127], dtype=torch.int8).repeat(k // 2 + 1)[:k].expand(33, k).contiguous()
    return [
        ("a=+127, w=+max", full(33, 127), full(40, w_max), 0),
        ("a=+127, w=-max", full(1, 127), full(24, -w_max), 0),
        ("a=-127, w=+max", full(33, -127), full(40, w_max), 0),
        ("a=-128, w=+max", full(1, -128), full(24, w_max), 0),
        ("a=-128, zp=127, w=-max", full(33, -128), full(40, -w_max), 127),
        ("a=+127, zp=-128, w=+max", full(1, 127), full(24, w_max), -128),
        ("alternating a=+-127, w=+-max", alt, signs(40, w_max), 0),
        ("random signs +-127 / +-max", signs(33, 127), signs(40, w_max), 0),
        ("random full range, zp=-37", torch.randint(-128, 128, (1, k), generator=gen, dtype=torch.int8),
         torch.randint(-w_max, w_max + 1, (24, k), generator=gen, dtype=torch.int8), -37),
    ]  # fmt: skip


def _exact(qa: Tensor, qw: Tensor, zp: int) -> Tensor:
    """Exact ``sum_k (qa - zp) * qw`` as float64 (M, N) (|acc| < 2**53)."""
    return (qa.double() - zp) @ qw.double().t()


def _check(name: str, got: Tensor, want: Tensor) -> str | None:
    if got.shape == want.shape and torch.equal(got, want):
        return None
    bad = int((got != want).sum()) if got.shape == want.shape else -1
    return f"{name}: {bad} of {want.numel()} outputs differ from the exact result"


def _u8(qa: Tensor) -> Tensor:
    return (qa.to(torch.int16) + 128).to(torch.uint8)


def _gate_gemm(k: int, w_max: int, gen: torch.Generator, use_onednn: bool) -> str | None:
    for name, qa, qw, zp in _gate_cases(k, w_max, gen):
        ref = _exact(qa, qw, zp)
        if zp == 0 and (err := _check(f"_int_mm int8 [{name}, K={k}]", int8_gemm(qa, qw.t()).double(), ref)):
            return err
        got = int8_gemm(_u8(qa), qw.t()).double() - (zp + 128) * qw.double().sum(1)
        if err := _check(f"_int_mm uint8 [{name}, K={k}]", got, ref):
            return err
        if use_onednn:
            ws = torch.rand(qw.shape[0], generator=gen) * 1e-3 + 1e-6
            pl = prepack_linear(qw, ws.reshape(-1, 1), kernel="onednn")
            got = qlinear(_u8(qa), zp + 128, pl.weights[0], pl.scales[0], pl.wzp, None)
            if err := _check(f"onednn qlinear [{name}, K={k}]", got, ref.to(torch.int32).float() * ws):
                return err
    return None


def _gate_grouped(k: int, w_max: int, gen: torch.Generator) -> str | None:
    """Group-wise accumulation through the ``sum`` post-op equals ``sum_g float(acc_g) * s_g`` in group order."""
    gs = max(4, k // 3 - 3)  # 4 groups, the last one ragged
    qa = (torch.randint(0, 2, (33, k), generator=gen, dtype=torch.int8) * 2 - 1) * 127
    qw = torch.randint(-w_max, w_max + 1, (40, k), generator=gen, dtype=torch.int8)
    ws = torch.rand(40, math.ceil(k / gs), generator=gen) * torch.logspace(-4, 0, 40).reshape(-1, 1)
    pl = prepack_linear(qw, ws, gs, kernel="onednn")
    y = packed_matmul(pl, _u8(qa), 128)
    want = torch.zeros(33, 40)
    for g, (lo, hi) in enumerate(pl.bounds):
        want += _exact(qa[:, lo:hi], qw[:, lo:hi], 0).to(torch.int32).float() * ws[:, g]
    return _check(f"onednn grouped sum post-op [K={k}, group {gs}]", y, want)


def _gate_conv(w_max: int, gen: torch.Generator) -> str | None:
    """3x3 padded conv on extreme codes: padded pixels must be the zero-point, sums exact."""
    c = 64
    for name, lo, hi, zp in (("u8 255 (code +127), zp 128", 255, 256, 128), ("u8 0/255 random, zp 0", 0, 256, 0)):
        q = torch.randint(lo, hi, (2, c, 6, 5), generator=gen, dtype=torch.uint8)
        qw = (torch.randint(0, 2, (24, c, 3, 3), generator=gen, dtype=torch.int8) * 2 - 1) * w_max
        ws = torch.rand(24, generator=gen) + 0.5
        pc = prepack_conv(qw, ws.reshape(-1, 1), qw.shape, (1, 1), (1, 1), (1, 1))
        got = qconv(q.contiguous(memory_format=torch.channels_last), zp, pc)
        acc = torch.nn.functional.conv2d(q.double() - zp, qw.double(), padding=1)
        if err := _check(f"onednn qconv [{name}]", got, acc.to(torch.int32).float() * ws.reshape(1, -1, 1, 1)):
            return err
    return None


def self_test(k_max: int, *, w_bits: int = 8) -> tuple[bool, str]:
    """Exactness gate for this CPU: (True, summary) when every int8 kernel used here is exact up to K = ``k_max``.

    Runs ``torch._int_mm`` and (when present) oneDNN's quantized linear (fused weight scale, zero-point, the group
    ``sum`` post-op) and conv (zero-point padding) on worst-case codes (all +-127 / -128 with +-(2**(w_bits-1)-1)
    weights, alternating and random signs) at K = ``k_max`` and K = 7, M = 33 and M = 1, against float64 integer
    matmuls. Fails on CPUs whose int8 path saturates int16 pair sums (no VNNI). ``w_bits=4`` checks only the range
    W4A8 needs (exact on such CPUs too). Well under a second (oneDNN generates a kernel per shape).
    """
    w_max = 2 ** (w_bits - 1) - 1
    if k_max < 1 or k_max * 255 * w_max >= 2**31:
        return False, f"k_max={k_max}: int32 accumulation of 8-bit x {w_bits}-bit codes can overflow"
    gen = torch.Generator().manual_seed(0)
    use_onednn = onednn_available()
    for k in sorted({k_max, min(k_max, 7)}, reverse=True):
        if err := _gate_gemm(k, w_max, gen, use_onednn):
            return False, err
    if use_onednn:
        if err := _gate_grouped(k_max, w_max, gen) or _gate_conv(w_max, gen):
            return False, err
    kernels = "torch._int_mm" + (", oneDNN qlinear/qconv" if use_onednn else "")
    return True, f"{kernels}: exact on worst-case int8 x int{w_bits} codes up to K={k_max}"
