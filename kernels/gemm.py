"""The integer GEMM: int8 activations (M, K) x 8- or 4-bit weight codes -> (M, N) fp16/bf16/fp32.

One kernel; the weight bit-width is a compile-time constant ``W_BITS``:

* 8: int8 weights stored (N, K) K-contiguous, loaded as a (BLOCK_K, BLOCK_N) tile;
* 4 (3-bit codes are stored as 4): uint8 (N, ceil(K/2)) packed as ``primitives.pack_int4`` does (byte j holds
  k = 2j in its low nibble and k = 2j+1 in its high nibble, two's complement; odd K pads the last high nibble with
  0); each (BLOCK_N, BLOCK_K/2) byte tile is loaded contiguously and unpacked to int8 in registers (Hopper has no
  int4 tensor cores: the gain is weight memory, not math).

The k-loop step (load A, load or unpack W, int32 ``tl.dot``), the group-wise flush and the fused epilogue
(zero-point fold, per-channel or group-wise weight scale, per-token or per-tensor activation scale, bias, output
cast; see :mod:`.gemm_parts`) are shared by both widths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_parts import GemmArgs, fold_zero_point, group_scale, prepare, store_output, tile_offsets
from .tiles import Tile

# ---- tile configs: kernels/tiles.py (INTERPRETER_TILE, GPU_RULES, GPU_RULES_W4*, GPU_SWEEP) ------------------------

W_BITS_STORED = (8, 4)


# ---- device code ----------------------------------------------------------------------------------------------------
@triton.jit
def _unpack_int4(b, BLOCK_K: tl.constexpr):
    """uint8 (BN, BK/2) -> int8 (BK, BN): low nibble = even k, high nibble = odd k, sign-extended."""
    lo = ((b & 0xF).to(tl.int8) ^ 8) - 8
    hi = ((b >> 4).to(tl.int8) ^ 8) - 8
    w = tl.reshape(tl.join(lo, hi), (b.shape[0], BLOCK_K))  # (BN, BK/2, 2) -> (BN, BK), k = 2j + i
    return tl.trans(w)


@triton.jit
def _k_step(
    acc, a_ptrs, w_ptrs, k0, offs_k, offs_n, m_ok, K, N, stride_ak, stride_wk,
    W_BITS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc += A[:, k0:k0+BK] @ W[k0:k0+BK, :] (int32); returns acc and both pointer tiles advanced by BLOCK_K."""
    k_ok = (k0 + offs_k) < K
    a = tl.load(a_ptrs, mask=m_ok & k_ok[None, :], other=0)  # (BM, BK) int8
    if W_BITS == 8:  # w_ptrs: (BK, BN) view of the (N, K) int8 codes
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n < N)[None, :], other=0)
    else:  # w_ptrs: (BN, BK/2) bytes of the (N, ceil(K/2)) packed codes
        j_ok = (k0 // 2 + tl.arange(0, BLOCK_K // 2)) < (K + 1) // 2
        w = _unpack_int4(tl.load(w_ptrs, mask=(offs_n < N)[:, None] & j_ok[None, :], other=0), BLOCK_K)
    acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    return acc, a_ptrs + BLOCK_K * stride_ak, w_ptrs + (BLOCK_K * W_BITS // 8) * stride_wk


@triton.jit
def _gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, w_sum_ptr, zp_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    stride_sam, stride_swn, stride_swg, stride_wsn, stride_wsg,
    W_BITS: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ZP: tl.constexpr,
    RAW_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = (offs_m < M)[:, None]
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    if W_BITS == 8:
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BK, BN) view of (N, K)
    else:
        offs_j = tl.arange(0, BLOCK_K // 2)  # packed byte columns
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_j[None, :] * stride_wk  # (BN, BK/2) of (N, ceil(K/2))
    acc_total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP_K == 0:  # one scale per output channel (or per tensor)
        for k0 in range(0, K, BLOCK_K):
            acc_total, a_ptrs, w_ptrs = _k_step(
                acc_total, a_ptrs, w_ptrs, k0, offs_k, offs_n, m_ok, K, N, stride_ak, stride_wk, W_BITS, BLOCK_K
            )
        acc_total = fold_zero_point(acc_total, zp_ptr, w_sum_ptr, offs_n, 0, stride_wsn, stride_wsg, N, HAS_ZP)
        y = acc_total.to(tl.float32) * group_scale(w_scale_ptr, offs_n, 0, stride_swn, stride_swg, N)[None, :]
    else:  # group-wise: exact int32 sum per group, then that group's scale (BLOCK_K divides GROUP_K)
        for g0 in range(0, K, GROUP_K):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for kk in range(0, GROUP_K, BLOCK_K):
                acc, a_ptrs, w_ptrs = _k_step(
                    acc, a_ptrs, w_ptrs, g0 + kk, offs_k, offs_n, m_ok, K, N, stride_ak, stride_wk, W_BITS, BLOCK_K
                )
            g = g0 // GROUP_K
            acc = fold_zero_point(acc, zp_ptr, w_sum_ptr, offs_n, g, stride_wsn, stride_wsg, N, HAS_ZP)
            acc_total += acc
            y += acc.to(tl.float32) * group_scale(w_scale_ptr, offs_n, g, stride_swn, stride_swg, N)[None, :]
    store_output(
        y, acc_total, out_ptr, a_scale_ptr, bias_ptr, offs_m, offs_n, M, N,
        stride_om, stride_on, stride_sam, HAS_BIAS, RAW_ACC,
    )  # fmt: skip


# ---- launcher -------------------------------------------------------------------------------------------------------
def gemm(
    qa: torch.Tensor,
    qw: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    k: int,
    w_bits: int,
    bias: torch.Tensor | None = None,
    a_zp: torch.Tensor | None = None,
    w_sum: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.float16,
    raw_acc: bool = False,
    tile: Tile | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = a_scale * w_scale * ((qa - a_zp) @ W^T) + bias`` as (M, N) ``out_dtype``.

    qa int8 (M, K); qw int8 (N, K) for ``w_bits`` 8, packed uint8 (N, ceil(K/2)) for ``w_bits`` 4 (3-bit codes
    are stored as 4-bit); a_scale fp32 (M,) or (1,); w_scale fp32 (1|N, 1|G); a_zp int32 (1,) static zero-point or
    None; w_sum int32 (N, 1|G) weight-code sums (required with a_zp). ``raw_acc=True`` returns the exact int32
    sums ``(qa - a_zp) @ W^T`` (M, N) instead (test hook: no scales, no bias). ``out`` (M, N) may be given (tests
    poison it to catch unwritten tiles).
    """
    if w_bits not in W_BITS_STORED:
        raise ValueError(f"w_bits must be one of {W_BITS_STORED} (storage bits), got {w_bits}")
    width, dtype = (k, torch.int8) if w_bits == 8 else ((k + 1) // 2, torch.uint8)
    if qw.dim() != 2 or qw.dtype != dtype or qw.shape[1] != width:
        kind = "int8" if w_bits == 8 else "packed uint8"
        got = f"{qw.dtype} {tuple(qw.shape)}"
        raise ValueError(f"{w_bits}-bit weights must be {kind} (N, {width}) for K={k}, got {got}")
    n = qw.shape[0]
    args = prepare(
        qa, n, k, a_scale, w_scale, bias=bias, w_sum=w_sum, a_zp=a_zp, group_size=group_size,
        out_dtype=out_dtype, raw_acc=raw_acc, tile=tile, out=out, packed4=w_bits == 4,
    )  # fmt: skip
    return _launch(args, qa, qw, n, k, w_bits, raw_acc)


def _launch(args: GemmArgs, qa: torch.Tensor, w: torch.Tensor, n: int, k: int, w_bits: int, raw: bool):
    """Launch the kernel on a 1-D swizzled grid."""
    m, t, ws = qa.shape[0], args.tile, args.w_sum
    if m == 0 or n == 0:
        return args.out
    if k == 0:
        raise ValueError("K must be > 0")
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n),)
    _gemm_kernel[grid](
        qa, w, args.out, args.a_scale, args.w_scale, args.bias, ws, args.a_zp,
        m, n, k,
        qa.stride(0), qa.stride(1), w.stride(0), w.stride(1), args.out.stride(0), args.out.stride(1),
        0 if args.a_scale.numel() == 1 else 1,
        0 if args.w_scale.shape[0] == 1 else args.w_scale.stride(0), args.w_scale.stride(1),
        ws.stride(0) if args.has_zp else 0, ws.stride(1) if args.has_zp else 0,
        W_BITS=w_bits, GROUP_K=args.group_k, HAS_BIAS=args.has_bias, HAS_ZP=args.has_zp, RAW_ACC=raw,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
        num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=False,
    )  # fmt: skip
    return args.out
