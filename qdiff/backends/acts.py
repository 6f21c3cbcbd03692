"""What a frozen op needs besides the packed weight: the activation spec, the conv geometry, the dynamic scales.

The dynamic activation scales are computed here once for every path (fake-quant, the torch reference and the
Triton host code): per token for Linear (:func:`token_scale`) and per sample for Conv2d (:func:`sample_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qdiff.numerics.primitives import compute_qparams, fake_quantize, token_qparams

ACT_MODES = ("dynamic", "static")


@dataclass(frozen=True, eq=False)
class ActSpec:
    """How a frozen layer quantizes its input.

    ``bits`` None keeps activations in floating point (weight-only). ``dynamic``: symmetric, scale per token
    (Linear) or per sample (Conv2d), computed on the fly. ``static``: asymmetric per tensor with the calibrated
    ``scale`` fp32 / ``zp`` int32, 0-d each, or (2,) each with ``split`` (the input channel where the second part
    of a concatenated Conv2d input starts; each part has its own quantizer).
    """

    bits: int | None = 8
    mode: str = "dynamic"
    scale: Tensor | None = None
    zp: Tensor | None = None
    split: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ACT_MODES:
            raise ValueError(f"activation mode must be one of {ACT_MODES}, got {self.mode!r}")
        if self.bits is not None and self.mode == "static" and (self.scale is None or self.zp is None):
            raise ValueError("static activations need a calibrated scale and zero-point")

    @property
    def static(self) -> bool:
        return self.bits is not None and self.mode == "static"

    def part(self, i: int) -> ActSpec:
        """The spec of split part ``i`` (0: channels < split, 1: the rest), without the split."""
        if self.split is None:
            raise ValueError("part() needs a split activation spec")
        if not self.static:
            return ActSpec(self.bits, self.mode)
        return ActSpec(self.bits, self.mode, self.scale.reshape(2)[i], self.zp.reshape(2)[i])  # type: ignore[union-attr]


@dataclass(frozen=True)
class ConvGeometry:
    """A groups=1 Conv2d's shape: weight (N, C, kh, kw), stride, padding (pairs or 'same'/'valid'), dilation."""

    weight_shape: tuple[int, int, int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight_shape[2], self.weight_shape[3]

    def explicit_padding(self) -> tuple[int, int] | None:
        """(ph, pw) for pair, 'valid' or 'same' padding; None for a 'same' that pads unevenly (even kernel)."""
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            total = [self.dilation[i] * (self.kernel[i] - 1) for i in range(2)]
            return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
        return (int(self.padding[0]), int(self.padding[1]))

    def out_hw(self, hw: tuple[int, int], padding: tuple[int, int]) -> tuple[int, int]:
        """Output (Ho, Wo) of an (H, W) input with explicit ``padding``."""
        k, s, d = self.kernel, self.stride, self.dilation
        return tuple(math.floor((hw[i] + 2 * padding[i] - d[i] * (k[i] - 1) - 1) / s[i] + 1) for i in range(2))  # type: ignore[return-value]


def token_scale(x: Tensor, bits: int) -> Tensor:
    """Dynamic symmetric scale per token (row over the last dim): (..., D) -> fp32 (..., 1)."""
    return token_qparams(x, bits)[0]


def sample_scale(x: Tensor, bits: int) -> Tensor:
    """Dynamic symmetric scale per sample: (B, ...) -> fp32 (B, 1, ..., 1) (same rank), absmax over all but dim 0."""
    amax = x.detach().reshape(x.shape[0], -1).abs().amax(dim=1).float()  # max is exact in any float dtype
    scale = compute_qparams(-amax, amax, bits, symmetric=True)[0]
    return scale.reshape(x.shape[0], *([1] * (x.dim() - 1)))


def fake_act(x: Tensor, act: ActSpec, per_sample: bool) -> Tensor:
    """Quantize -> dequantize ``x`` as the frozen op will (straight-through gradient); ``per_sample``: Conv2d."""
    if act.bits is None:
        return x
    if act.split is not None:  # each channel part with its own quantizer (Q-Diffusion shortcut splitting)
        parts = (x[:, : act.split], x[:, act.split :])
        return torch.cat([fake_act(p, act.part(i), per_sample) for i, p in enumerate(parts)], dim=1)
    if act.static:
        return fake_quantize(x, act.scale, act.zp, act.bits, symmetric=False)  # type: ignore[arg-type]
    scale = sample_scale(x, act.bits) if per_sample else token_scale(x, act.bits)
    return fake_quantize(x, scale, None, act.bits, symmetric=True)
