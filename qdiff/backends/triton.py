"""Triton backend: frozen Linear/Conv2d through the kernels in ``kernels/`` (installed as ``qdiff._kernels``).

Importing this module imports neither Triton nor the kernels; they load on the first call that runs here. Same
numerics as :mod:`qdiff.backends.reference`: identical activation codes (correctly rounded division, ties to even),
exact int32 accumulation and the reference's epilogue order, so the two agree bit for bit (tested through the
interpreter).

Convolutions run as GEMMs on the *integer* activations: quantize the input once (per-sample dynamic or static
scale), pad with the zero-point (a padded pixel is real 0, i.e. code ``zp``), im2col the int8 codes (a 1x1
stride-1 conv needs only a channels-last view), one GEMM with M = B*Ho*Wo and K = C*kh*kw.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.backends.acts import ActSpec, ConvGeometry, sample_scale
from qdiff.numerics.packed import PackedWeight
from qdiff.numerics.primitives import qrange, storage_bits

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_INSTALLED = importlib.util.find_spec("triton") is not None  # checked once, without importing triton


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (as found when this module was first imported)."""
    return _INSTALLED


class TritonBackend:
    """One GEMM kernel for 8-, 4- and 3-bit weights with 8- or 4-bit activations, on CUDA (or the interpreter).

    Not covered (the reference runs them): 2-bit weights (four per byte), weight-only layers, split activation
    quantizers (two scales), group sizes that are not a multiple of 16 (``tl.dot`` needs K tiles of >= 16), and a
    'same' padding that pads unevenly (even kernel).
    """

    name = "triton"

    def device_error(self, device: torch.device, requested: bool) -> str | None:
        """CUDA with Triton installed; the CPU interpreter (``TRITON_INTERPRET=1``) only when asked for by name."""
        if not triton_available():
            return "kernel 'triton' requested but triton is not installed (pip install 'qdiff[triton]')"
        if device.type == "cuda" or (requested and device.type == "cpu" and _interpreting()):
            return None
        return (
            f"kernel 'triton' requested for a tensor on {device.type}: Triton needs CUDA "
            "(or TRITON_INTERPRET=1 for the CPU interpreter); use kernel 'auto' or 'torch'"
        )

    def supports(self, op: str, x: Tensor, pw: PackedWeight, act: ActSpec, geom: ConvGeometry | None) -> bool:
        if act.bits is None or act.split is not None or storage_bits(pw.bits) not in (4, 8):
            return False
        if pw.grouped and pw.group_size % 16:  # type: ignore[operator]
            return False
        return op == "linear" or (geom is not None and geom.explicit_padding() is not None)

    def linear(self, x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None) -> Tensor:
        return linear(x, pw, act, bias)

    def conv2d(self, x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
        return conv2d(x, pw, act, bias, geom)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    """The kernel modules, imported on first use (this is where Triton itself gets imported)."""
    from qdiff._kernels import act_quant, gemm

    return act_quant, gemm


def _out_dtype(x: Tensor) -> torch.dtype:
    if x.dtype not in OUT_DTYPES:
        raise TypeError(f"quantized layers take fp16/bf16/fp32 inputs, got {x.dtype}")
    return x.dtype


def _gemm(qa: Tensor, pw: PackedWeight, a_scale: Tensor, a_zp: Tensor | None, bias, out_dtype) -> Tensor:
    """(M, K) int8 codes x packed weight -> (M, N) ``out_dtype`` with the fused epilogue."""
    _, gemm = _kernels()
    w_sum = pw.code_sums() if a_zp is not None else None  # static: fold the zero-point (cached by the module)
    return gemm.gemm(
        qa, pw.stored_codes(), a_scale, pw.scale, k=pw.k, w_bits=storage_bits(pw.bits), bias=bias, a_zp=a_zp,
        w_sum=w_sum, group_size=pw.group_size, out_dtype=out_dtype,
    )  # fmt: skip


def _quantize_rows(x2d: Tensor, act: ActSpec, scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(M, K) float -> (int8 codes, scale per row (M,) or per tensor, zero-point or None)."""
    act_quant, _ = _kernels()
    if act.static:
        qmin, qmax = qrange(act.bits, symmetric=False)
        return act_quant.quantize_given(x2d, act.scale, act.zp, qmin, qmax), act.scale, act.zp
    if scale is None:  # per token, scale computed in the kernel
        return (*act_quant.quantize_dynamic(x2d, act.bits), None)
    qmax = qrange(act.bits, symmetric=True)[1]
    return act_quant.quantize_given(x2d, scale, None, -qmax, qmax), scale, None


def linear(x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None) -> Tensor:
    """Frozen Linear, x (..., K) -> (..., N)."""
    out_dtype = _out_dtype(x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, pw.k)  # (M, K), any float dtype: the kernel converts to fp32 like x.float()
    qa, sa, zp = _quantize_rows(x2d, act, None)
    y = _gemm(qa, pw, sa, zp, bias, out_dtype)
    return y.reshape(*lead, y.shape[-1])


def conv2d(x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """Frozen Conv2d (groups=1), x (B, C, H, W) -> (B, N, Ho, Wo) contiguous NCHW."""
    pads = geom.explicit_padding()
    if pads is None:
        raise ValueError("uneven 'same' padding is not covered by the Triton backend (supports() says so)")
    out_dtype = _out_dtype(x)
    b, n = x.shape[0], geom.weight_shape[0]
    x2d = x.reshape(b, -1)  # (B, C*H*W): one row per sample
    sa = None if act.static else sample_scale(x2d, act.bits).reshape(-1)  # (B,) per sample, as the reference
    q2d, sa, zp = _quantize_rows(x2d, act, sa)
    cols, ho, wo = im2col_int8(q2d.reshape(x.shape), zp, geom, pads)  # (B*Ho*Wo, K)
    row_scale = sa if act.static else sa.reshape(-1).repeat_interleave(ho * wo)
    y = _gemm(cols, pw, row_scale, zp, bias, out_dtype)  # (B*Ho*Wo, N)
    return y.reshape(b, ho, wo, n).permute(0, 3, 1, 2).contiguous()


def im2col_int8(q: Tensor, zp: Tensor | None, geom: ConvGeometry, padding: tuple[int, int]) -> tuple[Tensor, int, int]:
    """int8 codes (B, C, H, W) -> (B*Ho*Wo, C*kh*kw) rows in the weight's (C, kh, kw) order, plus (Ho, Wo).

    Padded pixels get the code ``zp`` (real value 0); a 1x1 stride-1 unpadded conv is a channels-last view.
    """
    b, c, h, w = q.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geom.kernel, geom.stride, padding, geom.dilation
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return q.permute(0, 2, 3, 1).reshape(b * h * w, c), h, w
    if ph or pw:
        qp = F.pad(q, (pw, pw, ph, ph))
        if zp is not None:  # border := zp without reading zp on the host (no sync)
            border = torch.ones(1, 1, h, w, dtype=torch.bool, device=q.device)
            border = ~F.pad(border, (pw, pw, ph, ph))
            qp = torch.where(border, zp.reshape(()).to(torch.int8), qp)
        q = qp
    hp, wp = q.shape[-2:]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    q = q.contiguous()
    s_b, s_c, s_h, s_w = q.stride()
    cols = q.as_strided((b, ho, wo, c, kh, kw), (s_b, s_h * sh, s_w * sw, s_c, s_h * dh, s_w * dw))
    return cols.reshape(b * ho * wo, c * kh * kw), ho, wo
