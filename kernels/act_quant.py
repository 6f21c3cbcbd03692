"""Activation quantization: float (M, K) -> int8 codes (M, K), bit-identical to ``primitives.quantize``.

Two kernels:

* dynamic, symmetric, per row (token): ``scale = max(absmax / qmax, 1e-8)``, ``q = clamp(rne(x / scale))``;
* given scale (per row, or one per tensor with stride 0) and integer zero-point:
  ``q = clamp(rne(x / scale) + zp, qmin, qmax)`` (static asymmetric activations; per-sample conv scales).

Rounding matches the torch reference everywhere: the division is correctly rounded (``div_rn``; a bare
``/`` is approximate on NVIDIA GPUs) and round-half-to-even is built from ``floor`` and a parity fix, since
the interpreter has no libdevice ``rint``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import interpreting

# ---- tile configs ---------------------------------------------------------------------------------------------------
# (block_m, block_k, num_warps); the interpreter wants few, large programs.
DYNAMIC_TILE_GPU = (4, 1024, 4)
DYNAMIC_TILE_INTERPRETER = (16, 512, 1)
GIVEN_TILE_GPU = (8, 1024, 4)
GIVEN_TILE_INTERPRETER = (16, 1024, 1)

SCALE_EPS = 1e-8  # primitives.compute_qparams' default eps
_EPS = tl.constexpr(SCALE_EPS)


# ---- device code ----------------------------------------------------------------------------------------------------
@triton.jit
def round_half_even(v):
    """Round fp32 to the nearest integer, ties to even (== torch.round); exact for every finite fp32."""
    f = tl.floor(v)
    d = v - f  # exact: f <= v < f + 1
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _quantize_value(x, scale, zp, QMIN: tl.constexpr, QMAX: tl.constexpr):
    q = round_half_even(tl.math.div_rn(x, scale)) + zp
    return tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int8)


@triton.jit
def _act_quant_dynamic_kernel(
    x_ptr, q_ptr, scale_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk,
    QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: per-row absmax
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), _EPS)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    for k0 in range(0, K, BLOCK_K):  # pass 2: quantize (the row is still in L2)
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        q = _quantize_value(x.to(tl.float32), scale[:, None], 0.0, -QMAX, QMAX)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qk, q, mask=mask)


@triton.jit
def _act_quant_given_kernel(
    x_ptr, q_ptr, scale_ptr, zp_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk, stride_sm,
    QMIN: tl.constexpr, QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < K)[None, :]
    scale = tl.load(scale_ptr + rows * stride_sm, mask=row_ok, other=1.0)
    zp = tl.load(zp_ptr)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    q = _quantize_value(x.to(tl.float32), scale[:, None], zp, QMIN, QMAX)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qk, q, mask=mask)


# ---- launchers ------------------------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"expected a floating (M, K) tensor, got {x.dtype} {tuple(x.shape)}")


def _out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be {dtype} {shape} on {device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def quantize_dynamic(
    x: torch.Tensor, bits: int = 8, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization: x (M, K) float -> (q int8 (M, K), scale fp32 (M,)); ``out`` = (q, scale)."""
    _check_x(x)
    m, k = x.shape
    q = _out(None if out is None else out[0], (m, k), torch.int8, x.device)
    scale = _out(None if out is None else out[1], (m,), torch.float32, x.device)
    if m == 0:
        return q, scale
    bm, bk, warps = DYNAMIC_TILE_INTERPRETER if interpreting() else DYNAMIC_TILE_GPU
    bk = min(bk, triton.next_power_of_2(max(k, 16)))
    _act_quant_dynamic_kernel[(triton.cdiv(m, bm),)](
        x, q, scale, m, k, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        QMAX=2 ** (bits - 1) - 1, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    return q, scale


def quantize_given(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K) float, scale fp32 (M,) per row or (1,) per tensor, zero-point int (1 element) -> q int8 (M, K).

    The zero-point stays a device tensor (read by the kernel), so a static layer never syncs with the host.
    """
    _check_x(x)
    m, k = x.shape
    scale = scale.reshape(-1).to(device=x.device, dtype=torch.float32)
    if scale.numel() not in (1, m):
        raise ValueError(f"scale must have 1 or M={m} elements, got {scale.numel()}")
    zp = torch.zeros(1, dtype=torch.int32, device=x.device) if zero_point is None else zero_point
    zp = zp.reshape(-1).to(device=x.device, dtype=torch.int32)
    q = _out(out, (m, k), torch.int8, x.device)
    if q.numel() == 0:
        return q
    bm, bk, warps = GIVEN_TILE_INTERPRETER if interpreting() else GIVEN_TILE_GPU
    bm = min(bm, triton.next_power_of_2(m))
    bk = min(bk, triton.next_power_of_2(max(k, 16)))
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    _act_quant_given_kernel[grid](
        x, q, scale, zp, m, k,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), 0 if scale.numel() == 1 else 1,
        QMIN=qmin, QMAX=qmax, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    return q
