"""Pieces of the integer GEMM (:mod:`.gemm`): program-id swizzle, zero-point fold, fused epilogue, host-side checks.

Epilogue order is the torch reference's (``qdiff.backends.reference.linear``), so results match to the last bit:
``y = f32(acc - zp * wsum) * w_scale`` (summed per group, in group order, for group-wise scales), then
``y = y * a_scale``, ``y = y + bias``, ``y.to(out_dtype)``. Kernels are launched with
``enable_fp_fusion=False`` so the compiler does not contract ``y * s + b`` into an FMA on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .tiles import Tile, interpreting, pick_tile

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- device helpers -------------------------------------------------------------------------------------------------
@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row/column offsets of this program's output tile; GROUP_M row-blocks share weight tiles in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def fold_zero_point(acc, zp_ptr, w_sum_ptr, offs_n, g, stride_wsn, stride_wsg, N, HAS_ZP: tl.constexpr):
    """acc (BM, BN) int32 of q*w -> sum of (q - zp) * w, using the weight code sums of group ``g``."""
    if HAS_ZP:
        a_zp = tl.load(zp_ptr)
        wsum = tl.load(w_sum_ptr + offs_n * stride_wsn + g * stride_wsg, mask=offs_n < N, other=0)
        acc = acc - a_zp * wsum[None, :]
    return acc


@triton.jit
def group_scale(w_scale_ptr, offs_n, g, stride_swn, stride_swg, N):
    """(BN,) fp32 weight scales of group ``g`` (stride_swn == 0 for a per-tensor scale)."""
    return tl.load(w_scale_ptr + offs_n * stride_swn + g * stride_swg, mask=offs_n < N, other=0.0)


@triton.jit
def round_to_bf16(y):
    """fp32 -> nearest bf16 value (ties to even), still as fp32, so the final cast is exact everywhere.

    The interpreter's fp32 -> bf16 cast truncates; a GPU's rounds to nearest even. Rounding here first makes
    both (and torch's ``.to(torch.bfloat16)``) agree bit for bit.
    """
    b = y.to(tl.uint32, bitcast=True)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.to(tl.float32, bitcast=True)


@triton.jit
def store_output(
    y, acc_total, out_ptr, a_scale_ptr, bias_ptr,
    offs_m, offs_n, M, N,
    stride_om, stride_on, stride_sam,
    HAS_BIAS: tl.constexpr, RAW_ACC: tl.constexpr,
):  # fmt: skip
    """Row (activation) scale, bias, cast to the output dtype and store; or store the raw int32 sums."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if RAW_ACC:
        tl.store(ptrs, acc_total, mask=mask)
    else:
        sa = tl.load(a_scale_ptr + offs_m * stride_sam, mask=offs_m < M, other=0.0)
        y = y * sa[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            y = round_to_bf16(y)
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---- host side ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmArgs:
    """Validated launch arguments of the GEMM (the weight tensor itself is checked by the launcher)."""

    out: torch.Tensor
    a_scale: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor
    w_sum: torch.Tensor
    a_zp: torch.Tensor
    has_bias: bool
    has_zp: bool
    group_k: int
    tile: Tile


def prepare(
    qa: torch.Tensor,
    n: int,
    k: int,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    w_sum: torch.Tensor | None,
    a_zp: torch.Tensor | None,
    group_size: int | None,
    out_dtype: torch.dtype,
    raw_acc: bool,
    tile: Tile | None,
    out: torch.Tensor | None = None,
    packed4: bool = False,
) -> GemmArgs:
    """Check shapes/dtypes, allocate the output and pick the tile for an (M, K) x (N, K)^T integer GEMM."""
    if qa.dim() != 2 or qa.dtype != torch.int8 or qa.shape[1] != k:
        raise ValueError(f"activations must be int8 (M, {k}), got {qa.dtype} {tuple(qa.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    m, dev = qa.shape[0], qa.device
    a_scale = a_scale.reshape(-1).to(device=dev, dtype=torch.float32)
    if a_scale.numel() not in (1, m):
        raise ValueError(f"a_scale must have 1 or M={m} elements, got {a_scale.numel()}")
    w_scale = w_scale.to(device=dev, dtype=torch.float32)
    groups = -(-k // group_size) if group_size else 1
    if w_scale.dim() != 2 or w_scale.shape[0] not in (1, n) or w_scale.shape[1] not in (1, groups):
        raise ValueError(f"w_scale must be (1|{n}, 1|{groups}), got {tuple(w_scale.shape)}")
    group_k = group_size if (group_size and w_scale.shape[1] > 1) else 0
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have N={n} elements, got {bias.numel()}")
    has_zp = a_zp is not None  # static activations: the fold runs even for zp == 0 (no host sync to check)
    sums_shape = (n, groups if group_k else 1)
    if has_zp and (w_sum is None or tuple(w_sum.shape) != sums_shape):
        got = None if w_sum is None else tuple(w_sum.shape)
        raise ValueError(f"a_zp needs w_sum int32 {sums_shape} (weight code sums), got {got}")
    if tile is None:
        tile = pick_tile(m, n, group_k or None, interpreting(), packed4)
    elif group_k and group_k % tile.block_k:
        raise ValueError(f"tile.block_k={tile.block_k} must divide group_size={group_k}")
    want = (m, n, torch.int32 if raw_acc else out_dtype, dev)
    if out is None:
        out = torch.empty(m, n, dtype=want[2], device=dev)
    elif (*out.shape, out.dtype, out.device) != want:
        raise ValueError(f"out must be {want}, got {(*out.shape, out.dtype, out.device)}")
    dummy = a_scale  # any valid pointer for disabled operands
    return GemmArgs(
        out=out, a_scale=a_scale, w_scale=w_scale,
        bias=bias.reshape(-1).to(dev) if bias is not None else dummy,
        w_sum=w_sum.to(device=dev, dtype=torch.int32) if has_zp else dummy,
        a_zp=a_zp.reshape(-1).to(device=dev, dtype=torch.int32) if has_zp else dummy,
        has_bias=bias is not None, has_zp=has_zp, group_k=group_k, tile=tile,
    )  # fmt: skip
