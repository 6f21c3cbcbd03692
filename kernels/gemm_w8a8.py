"""W8A8 GEMM: int8 activations (M, K) x int8 weights stored (N, K) K-contiguous -> (M, N) fp16/bf16/fp32.

int32 accumulation on the tensor cores, fused epilogue (zero-point fold, per-channel or group-wise weight
scale, per-token or per-tensor activation scale, bias, output cast); see :mod:`.gemm_parts`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_parts import fold_zero_point, group_scale, launch, prepare, store_output, tile_offsets
from .tiles import Tile

# ---- tile configs: kernels/tiles.py (INTERPRETER_TILE, GPU_RULES, GPU_SWEEP) ---------------------------------------


# ---- device code ----------------------------------------------------------------------------------------------------
@triton.jit
def _w8a8_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, w_sum_ptr, zp_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    stride_sam, stride_swn, stride_swg, stride_wsn, stride_wsg,
    GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ZP: tl.constexpr, RAW_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = (offs_m < M)[:, None]
    n_ok = (offs_n < N)[None, :]
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BK, BN) view of (N, K)
    acc_total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP_K == 0:  # one scale per output channel (or per tensor)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=m_ok & k_ok[None, :], other=0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok, other=0)
            acc_total = tl.dot(a, w, acc_total, out_dtype=tl.int32)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        acc_total = fold_zero_point(acc_total, zp_ptr, w_sum_ptr, offs_n, 0, stride_wsn, stride_wsg, N, HAS_ZP)
        y = acc_total.to(tl.float32) * group_scale(w_scale_ptr, offs_n, 0, stride_swn, stride_swg, N)[None, :]
    else:  # group-wise: exact int32 sum per group, then that group's scale (BLOCK_K divides GROUP_K)
        for g0 in range(0, K, GROUP_K):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for kk in range(0, GROUP_K, BLOCK_K):
                k_ok = (g0 + kk + offs_k) < K
                a = tl.load(a_ptrs, mask=m_ok & k_ok[None, :], other=0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok, other=0)
                acc = tl.dot(a, w, acc, out_dtype=tl.int32)
                a_ptrs += BLOCK_K * stride_ak
                w_ptrs += BLOCK_K * stride_wk
            g = g0 // GROUP_K
            acc = fold_zero_point(acc, zp_ptr, w_sum_ptr, offs_n, g, stride_wsn, stride_wsg, N, HAS_ZP)
            acc_total += acc
            y += acc.to(tl.float32) * group_scale(w_scale_ptr, offs_n, g, stride_swn, stride_swg, N)[None, :]
    store_output(
        y, acc_total, out_ptr, a_scale_ptr, bias_ptr, offs_m, offs_n, M, N,
        stride_om, stride_on, stride_sam, HAS_BIAS, RAW_ACC,
    )  # fmt: skip


# ---- launcher -------------------------------------------------------------------------------------------------------
def gemm_w8a8(
    qa: torch.Tensor,
    qw: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    a_zp: torch.Tensor | None = None,
    w_sum: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.float16,
    raw_acc: bool = False,
    tile: Tile | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = a_scale * w_scale * ((qa - a_zp) @ qw^T) + bias`` as (M, N) ``out_dtype``.

    qa int8 (M, K); qw int8 (N, K); a_scale fp32 (M,) or (1,); w_scale fp32 (1|N, 1|G);
    a_zp int32 (1,) static zero-point or None;
    w_sum int32 (N, 1|G) weight-code sums (required with a_zp). ``raw_acc=True`` returns the exact int32 sums
    ``(qa - a_zp) @ qw^T`` (M, N) instead (test hook: no scales, no bias).
    ``out`` (M, N) may be given (tests poison it to catch unwritten tiles).
    """
    if qw.dim() != 2 or qw.dtype != torch.int8:
        raise ValueError(f"weights must be int8 (N, K), got {qw.dtype} {tuple(qw.shape)}")
    n, k = qw.shape
    args = prepare(
        qa, n, k, a_scale, w_scale, bias=bias, w_sum=w_sum, a_zp=a_zp, group_size=group_size,
        out_dtype=out_dtype, raw_acc=raw_acc, tile=tile, out=out,
    )  # fmt: skip
    return launch(_w8a8_kernel, args, qa, qw, n, k, raw_acc)
