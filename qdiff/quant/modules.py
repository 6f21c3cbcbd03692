"""Quantized Linear and Conv2d: one class per op with two states.

* ``fake``   — float weight kept; weights and activations are fake-quantized on the fly (calibration,
  sensitivity analysis). An attached observer switches the layer to plain float and records inputs.
* ``frozen`` — the float weight is gone; packed int8/int4/int2 weights (``qweight``) and fp32 scales
  (``w_scale``) live in buffers, and the forward runs the integer op in :mod:`qdiff.backends.ops`.

Both states compute the same function up to float rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiff.backends import ops
from qdiff.config.layer import LayerQuant
from qdiff.numerics.primitives import (
    compute_qparams,
    dequantize_weight,
    expand_group_param,
    fake_quantize,
    pack_weight,
    quantize_weight,
    storage_bits,
    token_qparams,
    unpack_weight,
    weight_minmax,
)
from qdiff.quant.observers import Observer, mse_weight_scale


def weight_scale(w2d: Tensor, q: LayerQuant) -> Tensor:
    """Symmetric weight scale for (N, K) weights: (1,1), (N,1) or (N, ceil(K/group_size)), fp32."""
    if q.method == "mse":
        return mse_weight_scale(w2d.float(), q.w_bits, q.granularity, q.group_size)
    lo, hi = weight_minmax(w2d.float(), q.granularity, q.group_size)
    return compute_qparams(lo, hi, q.w_bits, symmetric=True)[0]


class QuantLayer(nn.Module):
    """State and activation handling shared by :class:`QuantLinear` and :class:`QuantConv2d`."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(self, qcfg: LayerQuant, weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.qcfg = qcfg
        self.weight_shape = tuple(weight_shape)  # (N, K) or (N, C, kh, kw)
        self.state = "fake"
        self.observer: Observer | None = None  # set by calibration; forward then runs in float and records inputs
        self.kernel = ops.KernelPreference.AUTO
        self._w_scale_cache: Tensor | None = None
        self.register_load_state_dict_post_hook(_refresh_zp_sums_hook)  # derived w_sum follows loaded codes
        if qcfg.static_act:  # one (scale, zp) per tensor; (2,) with a_split: [first part, second part]
            shape = (2,) if qcfg.split_act else ()
            self.register_buffer("a_scale", torch.full(shape, float("nan")))
            self.register_buffer("a_zp", torch.zeros(shape, dtype=torch.int32))

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def in_features_2d(self) -> int:
        """K of the (N, K) weight view."""
        k = 1
        for d in self.weight_shape[1:]:
            k *= d
        return k

    @property
    def out_features_2d(self) -> int:
        return self.weight_shape[0]

    # ---- weights -------------------------------------------------------------------------------
    def _weight2d(self) -> Tensor:
        return self.weight.reshape(self.weight_shape[0], -1)

    def weight_scale(self) -> Tensor:
        if self.state == "frozen":
            return self.w_scale
        if self._w_scale_cache is None or self._w_scale_cache.device != self.weight.device:
            self._w_scale_cache = weight_scale(self._weight2d().detach(), self.qcfg)
        return self._w_scale_cache

    def fake_weight(self) -> Tensor:
        """Weight after quantize→dequantize, original shape and dtype (straight-through gradient)."""
        w2d = self._weight2d()
        scale = expand_group_param(self.weight_scale(), w2d.shape[1], self.qcfg.group_size)
        return fake_quantize(w2d, scale, None, self.qcfg.w_bits, symmetric=True).reshape(self.weight_shape)

    def dequantized_weight(self) -> Tensor:
        """Float32 weight as the layer computes with it (either state)."""
        if self.state == "fake":
            return self.fake_weight().detach().float()
        q = unpack_weight(self.qweight, self.qcfg.w_bits, self.in_features_2d)
        return dequantize_weight(q, self.w_scale, self.qcfg.group_size).reshape(self.weight_shape)

    @torch.no_grad()
    def freeze(self) -> None:
        """Pack the weight into ``qweight`` (int8 / packed uint8) + ``w_scale``; drop the float weight."""
        if self.state == "frozen":
            return
        if self.qcfg.static_act and not bool(torch.isfinite(self.a_scale).all()):
            raise RuntimeError("static activation range not calibrated; run calibration before freeze()")
        scale = self.weight_scale().float().contiguous()
        q = quantize_weight(self._weight2d().float(), scale, self.qcfg.w_bits, self.qcfg.group_size)
        packed = pack_weight(q, self.qcfg.w_bits).contiguous()
        del self.weight
        self.register_parameter("weight", None)
        self.register_buffer("qweight", packed)
        self.register_buffer("w_scale", scale)
        self._w_scale_cache = None
        self.state = "frozen"
        self.refresh_zp_sums()

    def refresh_zp_sums(self) -> None:
        """(Re)compute ``w_sum``: (N, G) int32 weight-code sums, a non-persistent buffer (never exported).

        Only for frozen layers with static activations: the Triton GEMM folds the zero-point into its epilogue
        as ``acc - zp * w_sum`` instead of re-reading the weights every call. Runs after freeze() and load.
        """
        if self.state != "frozen" or not self.qcfg.static_act or self.qcfg.split_act or self.qweight.is_meta:
            return  # split layers always run the torch reference, which does not use w_sum
        q = self.qcfg
        sums = ops.weight_sums(self.qweight, q.w_bits, self.in_features_2d, q.group_size, self.w_scale.shape[1])
        self.register_buffer("w_sum", sums, persistent=False)

    def make_frozen_shell(self, device: torch.device | str = "meta") -> None:
        """Turn a fresh fake layer into an empty frozen layer (buffers of the right shape) for loading."""
        n, k = self.out_features_2d, self.in_features_2d
        bits = storage_bits(self.qcfg.w_bits)
        per_byte = 8 // bits
        qdtype = torch.int8 if bits == 8 else torch.uint8
        groups = 1 if self.qcfg.granularity != "group" else -(-k // self.qcfg.group_size)
        rows = 1 if self.qcfg.granularity == "tensor" else n
        del self.weight
        self.register_parameter("weight", None)
        self.register_buffer("qweight", torch.empty(n, -(-k // per_byte), dtype=qdtype, device=device))
        self.register_buffer("w_scale", torch.empty(rows, groups, dtype=torch.float32, device=device))
        self.state = "frozen"

    def _adopt(self, layer: nn.Module) -> QuantLayer:
        """Share the float layer's parameters (no copy) and move own buffers to its device."""
        self.weight, self.bias = layer.weight, layer.bias
        for name, buf in list(self._buffers.items()):
            self._buffers[name] = buf.to(layer.weight.device)
        self.train(layer.training)
        return self

    # ---- activations ---------------------------------------------------------------------------
    def set_act_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Static (scale, zero-point): 0-d each, or 2 values each (a tensor or a pair) for a split layer."""
        self.a_scale.copy_(_per_part(scale).reshape(self.a_scale.shape))
        self.a_zp.copy_(_per_part(zero_point).reshape(self.a_zp.shape).to(torch.int32))

    def _dynamic_act_scale(self, xf: Tensor) -> Tensor:  # per token (Linear) / per sample (Conv2d)
        raise NotImplementedError

    def fake_act(self, x: Tensor) -> Tensor:
        q = self.qcfg
        if q.a_bits is None:
            return x
        if q.split_act:  # each channel part with its own quantizer (Q-Diffusion shortcut splitting)
            parts = (x[:, : q.a_split], x[:, q.a_split :])
            return torch.cat([self._fake_act_part(p, i) for i, p in enumerate(parts)], dim=1)
        if q.a_mode == "static":
            return fake_quantize(x, self.a_scale, self.a_zp, q.a_bits, symmetric=False)
        return fake_quantize(x, self._dynamic_act_scale(x.detach().float()), None, q.a_bits, symmetric=True)

    def _fake_act_part(self, x: Tensor, part: int) -> Tensor:
        q = self.qcfg
        if q.a_mode == "static":
            return fake_quantize(x, self.a_scale[part], self.a_zp[part], q.a_bits, symmetric=False)
        return fake_quantize(x, self._dynamic_act_scale(x.detach().float()), None, q.a_bits, symmetric=True)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes actually held by this layer's parameters and buffers (measured, not computed)."""
        tensors = list(self.parameters(recurse=False)) + list(self.buffers(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())
            return self._float_op(x, self.weight if self.state == "fake" else self.dequantized_weight().to(x.dtype))
        if self.state == "fake":
            return self._float_op(self.fake_act(x), self.fake_weight())
        ops.resolve_backend(self.kernel, x.device)
        return self._int_op(x)

    def _float_op(self, x: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def _int_op(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.qcfg.tag()}, shape={self.weight_shape}, state={self.state}"


class QuantLinear(QuantLayer):
    """Quantized ``nn.Linear``: weight (N, K); activations per token when dynamic."""

    def __init__(self, in_features: int, out_features: int, bias: bool, qcfg: LayerQuant, **factory) -> None:
        if qcfg.a_split is not None:
            raise ValueError("a_split (split activation quantizers) is only supported on Conv2d")
        super().__init__(qcfg, (out_features, in_features))
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

    @classmethod
    def from_float(cls, layer: nn.Linear, qcfg: LayerQuant) -> QuantLinear:
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, qcfg, device="meta")
        return m._adopt(layer)

    def _dynamic_act_scale(self, xf: Tensor) -> Tensor:
        return token_qparams(xf, self.qcfg.a_bits)[0]

    def _float_op(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _int_op(self, x: Tensor) -> Tensor:
        q = self.qcfg
        return ops.linear_int(
            x, self.qweight, self.w_scale, w_bits=q.w_bits, in_features=self.in_features, group_size=q.group_size,
            bias=self.bias, a_bits=q.a_bits, a_mode=q.a_mode,
            a_scale=getattr(self, "a_scale", None), a_zp=getattr(self, "a_zp", None),
            kernel=self.kernel, w_sum=getattr(self, "w_sum", None),
        )  # fmt: skip


class QuantConv2d(QuantLayer):
    """Quantized ``nn.Conv2d`` (groups=1): weight viewed as (N, C*kh*kw); dynamic activations per sample."""

    def __init__(self, conv_args: dict, bias: bool, qcfg: LayerQuant, **factory) -> None:
        n, c = conv_args["out_channels"], conv_args["in_channels"]
        kh, kw = conv_args["kernel_size"]
        if qcfg.a_split is not None and not 0 < qcfg.a_split < c:
            raise ValueError(f"a_split must be in [1, {c - 1}] for a Conv2d with {c} inputs, got {qcfg.a_split}")
        super().__init__(qcfg, (n, c, kh, kw))
        self.in_channels, self.out_channels, self.kernel_size = c, n, (kh, kw)
        self.stride, self.padding, self.dilation = conv_args["stride"], conv_args["padding"], conv_args["dilation"]
        self.weight = nn.Parameter(torch.empty(n, c, kh, kw, **factory))
        self.bias = nn.Parameter(torch.empty(n, **factory)) if bias else None

    @staticmethod
    def conv_args(layer: nn.Conv2d) -> dict:
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError("only Conv2d with groups=1 and zero padding can be quantized")
        return {
            "in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_size": tuple(layer.kernel_size), "stride": tuple(layer.stride),
            "padding": layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
            "dilation": tuple(layer.dilation),
        }  # fmt: skip

    @classmethod
    def from_float(cls, layer: nn.Conv2d, qcfg: LayerQuant) -> QuantConv2d:
        m = cls(cls.conv_args(layer), layer.bias is not None, qcfg, device="meta")
        return m._adopt(layer)

    def _dynamic_act_scale(self, xf: Tensor) -> Tensor:
        amax = xf.abs().amax(dim=(1, 2, 3), keepdim=True)
        return compute_qparams(-amax, amax, self.qcfg.a_bits, symmetric=True)[0]

    def _float_op(self, x: Tensor, w: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w.to(x.dtype), b, stride=self.stride, padding=self.padding, dilation=self.dilation)

    def _int_op(self, x: Tensor) -> Tensor:
        q = self.qcfg
        if q.split_act:  # two activation scales: the torch reference always (no Triton kernel covers it)
            return ops.conv2d_int_split(
                x, self.qweight, self.w_scale, split=q.a_split, w_bits=q.w_bits, weight_shape=self.weight_shape,
                stride=self.stride, padding=self.padding, dilation=self.dilation, group_size=q.group_size,
                bias=self.bias, a_bits=q.a_bits, a_mode=q.a_mode, a_scale=getattr(self, "a_scale", None),
                a_zp=getattr(self, "a_zp", None),
            )  # fmt: skip
        return ops.conv2d_int(
            x, self.qweight, self.w_scale, w_bits=q.w_bits, weight_shape=self.weight_shape, stride=self.stride,
            padding=self.padding, dilation=self.dilation, group_size=q.group_size, bias=self.bias,
            a_bits=q.a_bits, a_mode=q.a_mode, a_scale=getattr(self, "a_scale", None), a_zp=getattr(self, "a_zp", None),
            kernel=self.kernel, w_sum=getattr(self, "w_sum", None),
        )  # fmt: skip


def _per_part(value) -> Tensor:
    """A tensor from a tensor or a (first, second) pair of per-part values."""
    if isinstance(value, (tuple, list)):
        return torch.stack([torch.as_tensor(v).reshape(()) for v in value])
    return torch.as_tensor(value)


def _refresh_zp_sums_hook(module: QuantLayer, _incompatible_keys) -> None:
    module.refresh_zp_sums()


def quant_module_for(layer: nn.Module, qcfg: LayerQuant) -> QuantLayer:
    """Wrap a float Linear/Conv2d (fake state, sharing the float weight tensor)."""
    if isinstance(layer, nn.Linear):
        return QuantLinear.from_float(layer, qcfg)
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d.from_float(layer, qcfg)
    raise TypeError(f"cannot quantize {type(layer).__name__}")
