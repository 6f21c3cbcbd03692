"""Quantized Linear and Conv2d: one class per op with two states.

* ``fake``   — float weight kept; weights and activations are fake-quantized on the fly (calibration,
  sensitivity analysis). An attached observer switches the layer to plain float and records inputs.
* ``frozen`` — the float weight is gone; packed int8/int4/int2 weights (``qweight``) and fp32 scales
  (``w_scale``) live in buffers (viewed together as a :class:`~qdiff.numerics.packed.PackedWeight`), and the
  forward runs the integer op picked by :mod:`qdiff.backends.registry`.

Both states compute the same function up to float rounding (tested).

One resident copy of the codes: a backend that prepacks the codes in its own layout (cpu_int8) keeps that copy in
the layer's ``prepack_slot``; after the call the layer checks that the copy gives its codes back bit for bit and
then releases ``qweight`` (a ``meta`` placeholder of the stored shape and dtype stays, so names, shapes and order
of the state dict do not change). ``state_dict``, ``dequantized_weight``, the reference backend, a move to another
device and ``load_state_dict`` get the codes rebuilt from the copy (:meth:`QuantLayer.restore_codes`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiff.backends import heap, registry
from qdiff.backends.acts import ActSpec, ConvGeometry, fake_act
from qdiff.config.layer import LayerQuant
from qdiff.numerics.packed import PackedWeight, PrepackSlot
from qdiff.numerics.primitives import compute_qparams, expand_group_param, fake_quantize, weight_minmax
from qdiff.quant.observers import Observer, mse_weight_scale


def weight_scale(w2d: Tensor, q: LayerQuant) -> Tensor:
    """Symmetric weight scale for (N, K) weights: (1,1), (N,1) or (N, ceil(K/group_size)), fp32."""
    if q.method == "mse":
        return mse_weight_scale(w2d.float(), q.w_bits, q.granularity, q.group_size)
    lo, hi = weight_minmax(w2d.float(), q.granularity, q.group_size)
    return compute_qparams(lo, hi, q.w_bits, symmetric=True)[0]


def _weight_key(w: Tensor) -> tuple:
    """What autograd can see change about a weight: storage, version counter (in-place ops), device, dtype, shape."""
    return (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))


_FP32_BUFFERS = ("w_scale", "a_scale")  # kept in float32 by _apply
_GIVE_BACK_BYTES = 1 << 20  # released codes at least this large hand their pages back (1.6 ms per malloc_trim)
log = logging.getLogger(__name__)


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
        self.kernel = registry.AUTO  # backend preference (recipe key ``kernel``)
        self._mse_scale: tuple | None = None  # (weight key, block min, block max, scale): see weight_scale()
        self.prepack_slot = PrepackSlot()  # a backend's prepacked copy of the frozen codes (not a buffer)
        self._keep_codes = False  # the prepacked copy did not give the codes back exactly: keep both
        self.register_load_state_dict_post_hook(_refresh_zp_sums_hook)  # derived w_sum follows loaded codes
        if qcfg.static_act:  # one (scale, zp) per tensor; (2,) with a_split: [first part, second part]
            shape = (2,) if qcfg.split_act else ()
            self.register_buffer("a_scale", torch.full(shape, float("nan")))
            self.register_buffer("a_zp", torch.zeros(shape, dtype=torch.int32))

    def _apply(self, fn, recurse=True):
        """``.to()``/``.half()``/``.cuda()``: quantization scales move with the layer but stay fp32.

        Converting ``w_scale``/``a_scale`` to the pipeline's bf16/fp16 would round them and break the exactness of
        the integer path (the epilogue is fp32); codes and zero-points are integers and never converted. Released
        codes stay released when ``fn`` leaves CPU int8 tensors where they are (a dtype cast); any other move gets
        them back first (:meth:`restore_codes`) and moves them.
        """
        placeholder = None
        if self.codes_released():
            probe = fn(torch.empty(0, dtype=torch.int8))
            if probe.device.type != "cpu" or probe.dtype != torch.int8:
                self.restore_codes()
            else:  # the placeholder itself is not moved (a meta tensor cannot be copied out)
                placeholder, self._buffers["qweight"] = self._buffers["qweight"], None
        kept = {name: self._buffers[name] for name in _FP32_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        if placeholder is not None:
            self._buffers["qweight"] = placeholder
        return self

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
        """fp32 (1,1) / (N,1) / (N,G) scale of the current weight (frozen: the stored one).

        Min-max scales are recomputed on every call (one pass over W, a fraction of the fake-quant itself). An MSE
        scale (a 100-point search) is cached and recomputed when the weight's storage, version counter, device or
        dtype changes, or when any block's min or max changes: that also catches ``weight.data`` edits, which
        bypass the version counter.
        """
        if self.state == "frozen":
            return self.w_scale
        q, w2d = self.qcfg, self._weight2d().detach()
        lo, hi = weight_minmax(w2d.float(), q.granularity, q.group_size)
        if q.method != "mse":
            return compute_qparams(lo, hi, q.w_bits, symmetric=True)[0]
        key, cached = _weight_key(self.weight), self._mse_scale
        if cached is None or cached[0] != key or not (torch.equal(cached[1], lo) and torch.equal(cached[2], hi)):
            self._mse_scale = cached = (key, lo, hi, weight_scale(w2d, q))
        return cached[3]

    def fake_weight(self) -> Tensor:
        """Weight after quantize→dequantize, original shape and dtype (straight-through gradient)."""
        w2d = self._weight2d()
        scale = expand_group_param(self.weight_scale(), w2d.shape[1], self.qcfg.group_size)
        return fake_quantize(w2d, scale, None, self.qcfg.w_bits, symmetric=True).reshape(self.weight_shape)

    def dequantized_weight(self) -> Tensor:
        """Float32 weight as the layer computes with it (either state)."""
        if self.state == "fake":
            return self.fake_weight().detach().float()
        return self.packed_weight().dequantize().reshape(self.weight_shape)

    def packed_weight(self) -> PackedWeight:
        """The frozen weight as a :class:`PackedWeight` view of the ``qweight`` / ``w_scale`` buffers (no copy) and
        of the prepack slot (which holds the codes once they are released)."""
        q = self.qcfg
        sums = getattr(self, "w_sum", None)
        return PackedWeight(
            self.qweight, self.w_scale, q.w_bits, self.in_features_2d, q.group_size, sums=sums, slot=self.prepack_slot
        )

    # ---- one resident copy of the codes --------------------------------------------------------------------------
    def codes_released(self) -> bool:
        """True when the codes live only in a backend's prepacked copy (``qweight`` is a meta placeholder)."""
        return self.state == "frozen" and self.packed_weight().released

    @torch.no_grad()
    def _release_codes(self) -> None:
        """After a call that prepacked the codes: keep that copy only, if it gives the codes back bit for bit."""
        if self._keep_codes or self.prepack_slot.value is None or self.qweight.is_meta:
            return
        if not self.packed_weight().equals_slot():
            self._keep_codes = True
            log.warning("%s: the %s prepacked copy does not give the codes back exactly; keeping both copies",
                        self.extra_repr(), self.prepack_slot.value.backend)  # fmt: skip
            return
        freed = self.qweight.nbytes
        self._buffers["qweight"] = torch.empty_like(self.qweight, device="meta")
        if freed >= _GIVE_BACK_BYTES:  # the freed codes leave a hole mid-heap that glibc would keep resident
            heap.give_back()

    @torch.no_grad()
    def restore_codes(self) -> None:
        """Put the codes back into ``qweight`` (rebuilt from the prepacked copy if released) and drop that copy."""
        if self.codes_released():
            self._buffers["qweight"] = self.packed_weight().codes_from_slot()
        self.prepack_slot.value = None
        self._keep_codes = False

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """The state dict holds the codes even when released: rebuilt from the prepacked copy (a new tensor)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.codes_released():
            destination[prefix + "qweight"] = self.packed_weight().codes_from_slot()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """New codes or scales make the prepacked copy stale: the codes come back first and the copy is dropped."""
        if self.prepack_slot.value is not None and any(prefix + n in state_dict for n in ("qweight", "w_scale")):
            self.restore_codes()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _dispatch(self, op: str, x: Tensor, geom: ConvGeometry | None = None) -> Tensor:
        """Run the frozen op on the selected backend; release the codes once a backend holds an exact copy."""
        y = registry.dispatch(op, x, self.packed_weight(), self.act_spec(), self.bias, geom, preference=self.kernel)
        if self.prepack_slot.value is not None and not self._keep_codes:
            self._release_codes()
        return y

    def act_spec(self) -> ActSpec:
        """How the input is quantized (the static range buffers are shared, not copied)."""
        q = self.qcfg
        if q.static_act:
            return ActSpec(q.a_bits, q.a_mode, self.a_scale, self.a_zp, q.a_split if q.split_act else None)
        return ActSpec(q.a_bits, q.a_mode, split=q.a_split if q.split_act else None)

    @torch.no_grad()
    def freeze(self) -> None:
        """Pack the weight into ``qweight`` (int8 / packed uint8) + ``w_scale``; drop the float weight."""
        if self.state == "frozen":
            return
        if self.qcfg.static_act and not bool(torch.isfinite(self.a_scale).all()):
            raise RuntimeError("static activation range not calibrated; run calibration before freeze()")
        pw = PackedWeight.quantize(self._weight2d(), self.weight_scale(), self.qcfg.w_bits, self.qcfg.group_size)
        del self.weight
        self.register_parameter("weight", None)
        self.register_buffer("qweight", pw.codes)
        self.register_buffer("w_scale", pw.scale)
        self._mse_scale = None
        self.prepack_slot.value = None
        self.state = "frozen"
        self.refresh_zp_sums()

    def refresh_zp_sums(self) -> None:
        """(Re)compute ``w_sum``: (N, G) int32 weight-code sums, a non-persistent buffer (never exported).

        Only for frozen layers with static activations: the Triton GEMM folds the zero-point into its epilogue
        as ``acc - zp * w_sum`` instead of re-reading the weights every call. Runs after freeze() and load.
        """
        if self.state != "frozen" or not self.qcfg.static_act or self.qcfg.split_act:
            return  # split layers always run the torch reference, which does not use w_sum
        if self.qweight.is_meta and not self.codes_released():
            return  # a load shell
        self._buffers.pop("w_sum", None)  # recompute from the current codes, not from a stale cache
        self.register_buffer("w_sum", self.packed_weight().code_sums(), persistent=False)

    def make_frozen_shell(self, device: torch.device | str = "meta") -> None:
        """Turn a fresh fake layer into an empty frozen layer (buffers of the right shape) for loading."""
        q, n, k = self.qcfg, self.out_features_2d, self.in_features_2d
        pw = PackedWeight.empty(n, k, q.w_bits, q.granularity, q.group_size, device)
        del self.weight
        self.register_parameter("weight", None)
        self.register_buffer("qweight", pw.codes)
        self.register_buffer("w_scale", pw.scale)
        self.prepack_slot.value = None
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

    def fake_act(self, x: Tensor) -> Tensor:
        """Input after quantize→dequantize, as the frozen op quantizes it (straight-through gradient)."""
        return fake_act(x, self.act_spec(), per_sample=isinstance(self, QuantConv2d))

    # ---- bookkeeping ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held: this layer's parameters and buffers as they are (a meta placeholder holds none) and the
        backend's prepacked copy of its codes by its own account (its tensors' layout; ``tests/backends`` checks it
        against the C allocator)."""
        tensors = list(self.parameters(recurse=False)) + list(self.buffers(recurse=False))
        held = 0 if self.prepack_slot.value is None else self.prepack_slot.value.nbytes()
        return held + sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())
            return self._float_op(x, self.weight if self.state == "fake" else self.dequantized_weight().to(x.dtype))
        if self.state == "fake":
            return self._float_op(self.fake_act(x), self.fake_weight())
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

    def _float_op(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _int_op(self, x: Tensor) -> Tensor:
        return self._dispatch("linear", x)


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

    def _float_op(self, x: Tensor, w: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w.to(x.dtype), b, stride=self.stride, padding=self.padding, dilation=self.dilation)

    def geometry(self) -> ConvGeometry:
        return ConvGeometry(self.weight_shape, self.stride, self.padding, self.dilation)  # type: ignore[arg-type]

    def _int_op(self, x: Tensor) -> Tensor:
        return self._dispatch("conv2d", x, self.geometry())


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
