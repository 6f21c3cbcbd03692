"""Frozen layers as traceable torch ops that OpenVINO's converter turns into its int8 patterns.

While :func:`traced_layers` is active, every frozen :class:`~qdiff.quant.modules.QuantLayer` of a denoiser computes
its integer op with plain torch ops whose converted graph is what OpenVINO's CPU plugin runs in low precision:

* **weights** — the stored codes as an int8 constant (int4/int3 codes unpacked to one per byte; the exporter then
  rewrites them as 4-bit constants, :mod:`qdiff.engines.openvino.lowbit`) followed by ``Convert -> Multiply(scale)``
  (per channel) or ``Convert -> Multiply(scale[N, G, 1]) -> Reshape`` (per group): OpenVINO's compressed-weight
  pattern (the layout NNCF writes). The float weight never exists in the torch model.
* **static activations** (per tensor, asymmetric, calibrated by qdiff; split inputs per part) —
  ``torch.fake_quantize_per_tensor_affine`` with qdiff's scale and zero-point, which converts to ``FakeQuantize``;
  the CPU plugin then runs the MatMul / Convolution in int8.
* **dynamic activations of a Linear** (symmetric, per token) — left in float in the graph: the CPU plugin quantizes
  them at run time (``DYNAMIC_QUANTIZATION_GROUP_SIZE``, :mod:`qdiff.engines.openvino.runtime`), per token when that
  group size equals K, else per group of it.
* **dynamic activations of a Conv2d** (symmetric, per sample) — OpenVINO has no dynamic int8 convolution, so the
  quantizer is written out in float ops (absmax per sample, round, clamp): the same numbers as qdiff's, the
  convolution itself in float over the decompressed int8 weight.

BOS-aware K/V layers and split inputs keep working: only ``_int_op`` (the integer op) is replaced, the layer's own
``forward`` around it is unchanged. Nothing here runs at inference; it exists for ``ov.convert_model``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiff.backends.acts import ActSpec
from qdiff.numerics.primitives import qrange
from qdiff.quant.modules import QuantConv2d, QuantLayer, QuantLinear


def frozen_layers(den: nn.Module) -> dict[str, QuantLayer]:
    """Every frozen quantized layer of ``den`` by module name."""
    return {n: m for n, m in den.named_modules() if isinstance(m, QuantLayer) and m.state == "frozen"}


@contextmanager
def traced_layers(den: nn.Module) -> Iterator[dict[str, QuantLayer]]:
    """Inside the block, every frozen layer of ``den`` computes through OpenVINO-friendly ops (module docstring);
    the layers are restored on exit. Yields the layers by name.

    Each layer's int8 codes are taken out before tracing starts (a backend may keep them only in its own layout,
    which a tracer cannot read back): one int8 copy per 4-bit layer while the block runs, none for 8-bit codes the
    layer still holds."""
    layers = frozen_layers(den)
    for layer in layers.values():
        pw = layer.packed_weight()
        weight = TracedWeight(pw.unpack(), pw.scale, pw.group_size if pw.grouped else None)
        op = _linear if isinstance(layer, QuantLinear) else _conv
        layer._int_op = functools.partial(op, layer, weight)  # an instance attribute shadows the class method
    try:
        yield layers
    finally:
        for layer in layers.values():
            vars(layer).pop("_int_op", None)


@dataclass(frozen=True, eq=False)
class TracedWeight:
    """A frozen layer's weight as the trace reads it: int8 codes (N, K), fp32 scales (1|N, 1) or (N, G)."""

    codes: Tensor
    scale: Tensor
    group_size: int | None

    def decompressed(self) -> Tensor:
        """fp32 (N, K) as ``int8 codes -> float -> * scale`` (per group: through (N, G, g) and back), the ops that
        become OpenVINO's decompression subgraph. A ragged last group is padded with zero codes, then cut off."""
        codes, scale = self.codes, self.scale
        if self.group_size is None:
            return codes.to(torch.float32) * scale
        n, k = codes.shape
        g, groups = self.group_size, scale.shape[1]
        if groups * g != k:
            codes = F.pad(codes, (0, groups * g - k))
        w = (codes.reshape(n, groups, g).to(torch.float32) * scale.reshape(n, groups, 1)).reshape(n, groups * g)
        if groups * g != k:
            w = w[:, :k]
        # The trailing Convert: OpenVINO's CPU plugin (2026.4) fuses a bias onto a group-decompressed MatMul only when
        # the decompression ends with one, as NNCF writes it (else compile fails: "Check 'data.size() == OC'").
        return w.to(torch.float32)

    def splittable(self, channel: int, shape: tuple[int, ...]) -> bool:
        """Whether the weight splits at input ``channel`` into two weights with their own scales (per-channel or
        per-tensor scales always; group-wise only when the split falls on a group boundary)."""
        return self.group_size is None or (channel * shape[2] * shape[3]) % self.group_size == 0

    def split(self, channel: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The (N, C, kh, kw) fp32 weights of input channels [0, channel) and [channel, C), each decompressed from its
        own int8 codes (so each keeps OpenVINO's compressed-weight pattern)."""
        n, c, kh, kw = shape
        cut = channel * kh * kw
        out = []
        for lo, hi, cin in ((0, cut, channel), (cut, self.codes.shape[1], c - channel)):
            scale = (
                self.scale
                if self.group_size is None
                else self.scale[:, lo // self.group_size : -(-hi // self.group_size)]
            )
            part = TracedWeight(self.codes[:, lo:hi].contiguous(), scale.contiguous(), self.group_size)
            out.append(part.decompressed().reshape(n, cin, kh, kw))
        return out[0], out[1]


def _fake_static(x: Tensor, act: ActSpec) -> Tensor:
    qmin, qmax = qrange(act.bits, symmetric=False)  # type: ignore[arg-type]
    return torch.fake_quantize_per_tensor_affine(x, float(act.scale), int(act.zp), qmin, qmax)  # type: ignore[arg-type]


def _fake_per_sample(x: Tensor, bits: int) -> Tensor:
    """qdiff's dynamic per-sample symmetric quantizer in float ops (absmax over all but dim 0)."""
    qmax = float(qrange(bits, symmetric=True)[1])
    amax = x.abs().amax(dim=(1, 2, 3), keepdim=True)
    scale = torch.clamp(amax / qmax, min=1e-8)
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def _act(x: Tensor, act: ActSpec, conv: bool) -> Tensor:
    if act.bits is None:
        return x
    if act.split is not None:
        parts = (x[:, : act.split], x[:, act.split :])
        return torch.cat([_act(p, act.part(i), conv) for i, p in enumerate(parts)], dim=1)
    if act.static:
        return _fake_static(x, act)
    return _fake_per_sample(x, act.bits) if conv else x  # Linear: quantized by the plugin at run time


def _linear(self: QuantLinear, weight: TracedWeight, x: Tensor) -> Tensor:
    bias = None if self.bias is None else self.bias.to(torch.float32)
    return F.linear(_act(x.to(torch.float32), self.act_spec(), conv=False), weight.decompressed(), bias).to(x.dtype)


def _conv(self: QuantConv2d, weight: TracedWeight, x: Tensor) -> Tensor:
    act, bias = self.act_spec(), None if self.bias is None else self.bias.to(torch.float32)
    geometry = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
    dtype, x = x.dtype, x.to(torch.float32)
    if act.split is not None and act.bits is not None and weight.splittable(act.split, self.weight_shape):
        # one convolution per input part, each behind its own quantizer, summed: qdiff's math. As one convolution
        # of the concatenated parts, OpenVINO's low-precision passes give the Concat a single quantization interval
        # (measured 1.3% off the reference on a split 3x3 conv); two convolutions keep both quantizers exact.
        parts = (x[:, : act.split], x[:, act.split :])
        weights = weight.split(act.split, self.weight_shape)
        y = F.conv2d(_act(parts[0], act.part(0), conv=True), weights[0], bias, **geometry)
        y = y + F.conv2d(_act(parts[1], act.part(1), conv=True), weights[1], None, **geometry)
    else:
        y = F.conv2d(_act(x, act, conv=True), weight.decompressed().reshape(self.weight_shape), bias, **geometry)
    return y.to(dtype)
