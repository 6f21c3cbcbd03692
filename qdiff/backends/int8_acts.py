"""Activation codes for the CPU int8 kernels: uint8 ``q + 128`` equal to the reference's int8 codes, and layouts.

The codes are those of :func:`qdiff.numerics.primitives.quantize` (``clamp(round(x.float() / scale) + zp, lo, hi)``,
round half to even), in fewer passes over memory and with at most one activation-sized temporary
(``python scripts/bench_int8_acts.py``, one Zen 4 core, 2026-12-01: 1.6-1.7 ms on a 2048 x 1280 activation, fp32 or
bf16):

* a bf16 / fp16 input is cast to fp32 once and that private copy is divided in place: reductions over bf16 cost
  ~5x those over fp32 (1.37 vs 0.29 ms), and each fresh activation-sized buffer costs page faults that made single
  ops 10-15x slower in some runs (the quantizer on bf16 input: 12.8 ms with one more temporary, 1.6-2.1 ms without);
* ``v = x / scale`` is clamped to ``[lo - zp, hi - zp]`` *before* rounding (equal: the bounds are integers and
  rounding is monotone), then rounded by adding ``R = 1.5 * 2**23 + 128``: every fp32 in ``[2**23, 2**24)`` is an
  integer, so the one correctly rounded addition gives ``R + round_half_even(v)`` (``R`` is even, so a tie goes
  where round-half-even sends it), whose IEEE bit pattern is ``0x4B400000 + 128 + round(v)``: its low byte, read
  by an int32 -> uint8 conversion (modulo 256), is ``round(v) + 128``. An odd static zero-point is added
  afterwards in uint8 (modulo 256, exact: ``round(v) + zp`` lies in ``[lo, hi]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.numerics.primitives import compute_qparams, qrange

__all__ = ["quantize_act", "u8_codes", "transpose_per_sample", "to_channels_last", "to_nchw", "im2col_u8"]

_LOOP_HW = 1024  # pixels per image from which per-sample transposed copies beat one strided copy (measured)
_ROUND = 12582912.0  # 1.5 * 2**23: x + _ROUND is an integer-valued fp32 (half to even) for |x| <= 2**22


def u8_codes(xf: Tensor, scale: Tensor, zp: int, lo: int, hi: int, *, inplace: bool = False) -> Tensor:
    """uint8 ``clamp(round(xf / scale) + zp, lo, hi) + 128`` for fp32 ``xf`` (any shape, its layout kept).

    ``scale``: fp32, broadcastable to ``xf``; ``zp``: an integer in ``[lo, hi]``; ``[lo, hi]`` within ``[-128, 127]``.
    ``inplace``: ``xf`` is a private copy the computation may overwrite (one activation-sized allocation fewer).
    """
    if xf.dtype != torch.float32:
        raise TypeError(f"u8_codes takes fp32 activations, got {xf.dtype}")
    if scale.dim() == 0:
        scale = scale.reshape(1)
    t = xf.div_(scale.float()) if inplace else torch.div(xf, scale.float())
    t.clamp_(lo - zp, hi - zp)
    even = zp % 2 == 0
    t.add_(_ROUND + 128 + (zp if even else 0))
    codes = t.view(torch.int32).to(torch.uint8)
    if not even:
        codes.add_(zp % 256)
    return codes


def quantize_act(
    x: Tensor, a_bits: int, a_mode: str, a_scale: Tensor | None, a_zp: Tensor | None
) -> tuple[Tensor, int, Tensor]:
    """Activation codes of ``x`` (M, K) (dynamic: per row) or (B, C, H, W) (dynamic: per sample), offset to uint8.

    Returns ``(q + 128`` uint8 in x's layout; ``zp + 128``; scale fp32 (M, 1) / (B, 1, 1, 1) dynamic, all-ones shape
    static``)`` where ``q`` are the reference's int8 codes (symmetric dynamic absmax scale from
    :func:`compute_qparams`; static asymmetric per tensor). oneDNN's fast int8 kernels take uint8 sources only.
    """
    rank = x.dim()
    private = x.dtype != torch.float32  # the fp32 cast is a fresh copy: divide it in place
    xf = x.float() if private else x
    if a_mode == "dynamic":
        rows = xf.flatten(1)
        absmax = torch.maximum(rows.amin(dim=-1, keepdim=True).neg_(), rows.amax(dim=-1, keepdim=True))
        scale = compute_qparams(-absmax, absmax, a_bits, symmetric=True)[0].reshape(-1, *([1] * (rank - 1)))
        lo, hi = qrange(a_bits, True)
        return u8_codes(xf, scale, 0, lo, hi, inplace=private), 128, scale
    if a_mode == "static":
        zp = _scalar_zp(a_scale, a_zp)
        lo, hi = qrange(a_bits, False)
        scale = a_scale.detach().float()  # type: ignore[union-attr]
        return u8_codes(xf, scale, zp, lo, hi, inplace=private), zp + 128, scale.reshape([1] * rank)
    raise ValueError(f"a_mode must be 'dynamic' or 'static', got {a_mode!r}")


def _scalar_zp(a_scale: Tensor | None, a_zp: Tensor | None) -> int:
    if a_scale is None or a_zp is None or a_scale.numel() != 1 or a_zp.numel() != 1:
        raise ValueError("static activations need per-tensor a_scale and a_zp (one element each)")
    return int(a_zp.reshape(()).item())


def transpose_per_sample(t: Tensor) -> Tensor:
    """(B, X, Y) -> contiguous (B, Y, X): one 2-D transposed copy per sample (ATen's blocked transpose, which a
    single 3-D strided copy does not use)."""
    b, x, y = t.shape
    out = torch.empty((b, y, x), dtype=t.dtype, device=t.device)
    for i in range(b):
        out[i].copy_(t[i].t())
    return out


def to_channels_last(t: Tensor) -> Tensor:
    """(B, C, H, W) -> the same values in channels-last memory.

    Large images: one 2-D transposed copy per sample (ATen's blocked transpose), 2-5x faster here than
    ``.contiguous(memory_format=torch.channels_last)`` (uint8, 2 x 320 x 64 x 64: 1.8 ms vs 8.8 ms); below
    ``_LOOP_HW`` pixels one strided copy (per-sample calls cost more than they save on 32 x 64 x 8 x 8).
    """
    if t.is_contiguous(memory_format=torch.channels_last):
        return t
    b, c, h, w = t.shape
    if h * w < _LOOP_HW:
        return t.contiguous(memory_format=torch.channels_last)
    return transpose_per_sample(t.reshape(b, c, h * w)).view(b, h, w, c).permute(0, 3, 1, 2)


def to_nchw(t: Tensor) -> Tensor:
    """Channels-last (B, C, H, W) -> contiguous NCHW: one 2-D transposed copy per sample for large images with
    many channels (2 x 1280 x 32 x 32 fp32: 2.6 ms vs 3.6 ms), else ``.contiguous()`` (32 x 32 x 64 x 64: 4.4 ms vs
    5.2 ms)."""
    b, c, h, w = t.shape
    if h * w < _LOOP_HW or c < 128:
        return t.contiguous()
    return transpose_per_sample(t.permute(0, 2, 3, 1).reshape(b, h * w, c)).view(b, c, h, w)


def im2col_u8(
    q: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
    fill: int,
) -> tuple[Tensor, int, int]:
    """Patches of uint8 codes ``q`` (B, C, H, W) as rows: ((B * Ho * Wo, C * kh * kw) uint8, Ho, Wo).

    Column order (C, kh, kw), the order of a flattened Conv2d weight; ``pads`` (top, bottom, left, right) are
    filled with the code ``fill`` (the zero-point: the real value 0). ``F.unfold`` has no uint8 kernel. Two copies:
    the windows in (C, kh, kw, Ho, Wo) order (runs of Wo bytes), then one 2-D transposed copy per sample (ATen's
    blocked transpose); measured 4x faster here than one 6-D gather copy (2 x 320 x 64 x 64, 3x3: 19 ms vs 76 ms;
    ``scripts/bench_int8_acts.py``).
    """
    top, bottom, left, right = pads
    if any(pads):
        q = F.pad(q, (left, right, top, bottom), value=fill)
    q = q.contiguous()
    b, c, h, w = q.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    sb, sc, sy, sx = q.stride()
    win = q.as_strided((b, c, kh, kw, ho, wo), (sb, sc, sy * dh, sx * dw, sy * sh, sx * sw))
    k, length = c * kh * kw, ho * wo
    by_k = win.reshape(b, k, length)  # (B, K, L): a copy (the windows overlap)
    return transpose_per_sample(by_k).view(b * length, k), ho, wo
