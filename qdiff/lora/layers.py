"""LoRA layers for qdiff's frozen integer layers, following PEFT's ``LoraLayer`` conventions.

``QuantLoraLinear`` wraps a :class:`~qdiff.quant.modules.QuantLinear` (BOS-aware ones included) and
``QuantLoraConv2d`` a :class:`~qdiff.quant.modules.QuantConv2d`; PEFT builds them through its custom-module extension
point (``LoraConfig._register_custom_module``, registered by :mod:`qdiff.lora.inject`). The wrapped layer is never
touched: its packed codes, scales and backend stay as they are, and the low-rank branch runs beside it in the float
compute dtype (Hu et al. 2021, arXiv 2106.09685)::

    y = frozen(x) + sum_i scaling_i * B_i(A_i(dropout(x)))     Linear: A (r, K), B (N, r)
                                                               Conv2d: A (r, C, kh, kw) with the layer's stride,
                                                               padding, dilation; B (N, r, 1, 1)

``scaling_i = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) times the ``set_adapters`` weight. Adapters, scales,
``disable_adapters``, ``delete_adapter`` and mixed-batch ``adapter_names`` are PEFT's own ``LoraLayer`` code, so
diffusers' ``set_adapters`` / ``disable_lora`` / ``unload_lora_weights`` / ``delete_adapters`` work unchanged.
``merge`` (``fuse_lora``) is refused: folding a delta into integer codes would re-quantize the layer; fuse the LoRA
into the float model before quantizing instead (``qdiff quantize --lora PATH:SCALE``, docs/lora.md).

This module imports PEFT; ``import qdiff`` never imports it (qdiff.lora.inject loads it when a LoRA is loaded).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import Tensor, nn

from qdiff.errors import QdiffError
from qdiff.quant.modules import QuantConv2d, QuantLayer, QuantLinear

FUSE_REFUSED = (
    "fuse_lora on a qdiff-quantized layer would re-quantize its integer weights (lossy); fuse the LoRA into the "
    "float model before quantizing: qdiff quantize --lora PATH:SCALE (or qdiff.quantize(pipe, recipe, "
    "loras=['PATH:SCALE'])), see docs/lora.md"
)
_VARIANTS = ("use_dora", "use_qalora", "use_bdlora", "alora_invocation_tokens", "velora_config", "arrow_config",
             "monteclora_config", "kasa_config")  # fmt: skip


def layer_device(base: QuantLayer) -> torch.device:
    """Where a quantized layer computes: its fp32 scales (frozen) or float weight (fake). Never ``qweight``, which
    is a ``meta`` placeholder once the cpu_int8 backend holds the codes in its prepacked copy."""
    if base.state == "frozen":
        return base.w_scale.device
    return base.weight.device


class _QuantLoraLayer(nn.Module, LoraLayer):
    """The shared part: construction, adapter factors, placement, forward, refused merge."""

    def __init__(self, base_layer: QuantLayer, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, compute_dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:  # fmt: skip
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.compute_dtype = compute_dtype  # float dtype of the branch when it is created (the model's float parts)
        self.fan_in_fan_out = False
        self._scaled: list[float] = []  # scale_layer factors not yet undone (a refused fuse puts them back)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # ---- PEFT hooks --------------------------------------------------------------------------------------------
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return _in_out(module)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        """PEFT places new adapter weights here: the quantized layer's device and the float compute dtype."""
        return layer_device(base_layer), self.compute_dtype

    def _factors(self, r: int, bias: bool) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        """Add adapter ``adapter_name``: A, B (``_factors``), dropout, scaling; plain LoRA only."""
        used = [v for v in _VARIANTS if getattr(config, v, None)]
        if used:
            raise QdiffError(f"LoRA variant {used[0]} is not supported on qdiff-quantized layers (plain LoRA only)")
        init = config.init_lora_weights
        if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
            raise QdiffError(f"init_lora_weights={init!r} needs the float weight; not supported on quantized layers")
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
        self.lora_dropout[adapter_name] = dropout
        self.lora_A[adapter_name], self.lora_B[adapter_name] = self._factors(r, bool(config.lora_bias))
        self.lora_bias[adapter_name] = bool(config.lora_bias)
        self.use_rslora[adapter_name] = bool(config.use_rslora)
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        if init:
            self.reset_lora_parameters(adapter_name, init)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``frozen(x) + sum scaling * B(A(dropout(x)))`` over the active adapters; (B, ..., N) / (B, N, H', W').

        Written for a low per-call cost (it runs beside every quantized layer of every denoiser call): the adapter
        bookkeeping is read once, and without autograd ``result += scaling * B @ low`` is one in-place GEMM."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self._disable_adapters:
            self._check_forward_args(x, *args, adapter_names=adapter_names, **kwargs)
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters:
            return result
        active = self._active_adapter
        fused = not torch.is_grad_enabled()
        for name in (active,) if isinstance(active, str) else active:
            a = self.lora_A._modules.get(name)
            if a is None:
                continue
            w = a.weight
            xa = x if x.dtype == w.dtype else x.to(w.dtype)
            if self.training:
                xa = self.lora_dropout[name](xa)
            result = self._add_branch(result, xa, a, self.lora_B[name], self.scaling[name], fused)
        return result

    def _add_branch(self, y: Tensor, x: Tensor, a: nn.Module, b: nn.Module, scaling: float, fused: bool) -> Tensor:
        """``y + scaling * B(A(x))`` (in place when ``fused`` allows it)."""
        raise NotImplementedError

    # ---- merge: refused ----------------------------------------------------------------------------------------
    def scale_layer(self, scale: float) -> None:
        super().scale_layer(scale)
        if scale != 1:
            self._scaled.append(scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        super().unscale_layer(scale)
        if scale is None:
            self._scaled.clear()
        elif self._scaled:
            self._scaled.pop()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refused (see the module docstring). A ``scale_layer`` that ``fuse_lora`` applied just before is undone
        first, so a refused fuse leaves every layer as it was."""
        if self._scaled:
            self.unscale_layer(self._scaled[-1])
        raise QdiffError(FUSE_REFUSED)

    def unmerge(self) -> None:
        """Nothing is ever merged into a quantized layer."""

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The adapter's weight delta ``scaling * B @ A`` in the base weight's shape, float32 (tests, diagnostics)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return "qdiff_lora." + super().__repr__()


class QuantLoraLinear(_QuantLoraLayer):
    """LoRA beside a frozen :class:`QuantLinear`: A ``nn.Linear(K, r)``, B ``nn.Linear(r, N)``."""

    def _factors(self, r: int, bias: bool) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(self.in_features, r, bias=False), nn.Linear(r, self.out_features, bias=bias)

    def _add_branch(self, y: Tensor, x: Tensor, a: nn.Module, b: nn.Module, scaling: float, fused: bool) -> Tensor:
        low = F.linear(x, a.weight)  # (..., r)
        if fused and b.bias is None and y.dtype == low.dtype and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(low.view(-1, low.shape[-1]), b.weight.t(), alpha=scaling)
            return y
        return y + (F.linear(low, b.weight, b.bias) * scaling).to(y.dtype)

    def get_delta_weight(self, adapter: str) -> Tensor:
        a, b = self.lora_A[adapter].weight.float(), self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]


class QuantLoraConv2d(_QuantLoraLayer):
    """LoRA beside a frozen :class:`QuantConv2d`: A a Conv2d (C -> r) with the layer's geometry, B a 1x1 Conv2d."""

    def _factors(self, r: int, bias: bool) -> tuple[nn.Module, nn.Module]:
        base = self.get_base_layer()
        a = nn.Conv2d(self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        return a, nn.Conv2d(r, self.out_features, 1, 1, bias=bias)

    def _add_branch(self, y: Tensor, x: Tensor, a: nn.Module, b: nn.Module, scaling: float, fused: bool) -> Tensor:
        low = F.conv2d(x, a.weight, None, a.stride, a.padding, a.dilation)  # (B, r, H', W')
        if fused and b.bias is None and y.dtype == low.dtype and y.is_contiguous() and low.is_contiguous():
            n, r = b.weight.shape[:2]  # (B, N, H'W') += scaling * B (N, r) @ low (B, r, H'W')
            w = b.weight.view(1, n, r).expand(low.shape[0], n, r)
            y.view(low.shape[0], n, -1).baddbmm_(w, low.view(low.shape[0], r, -1), alpha=scaling)
            return y
        return y + (F.conv2d(low, b.weight, b.bias) * scaling).to(y.dtype)

    def get_delta_weight(self, adapter: str) -> Tensor:
        a, b = self.lora_A[adapter].weight.float(), self.lora_B[adapter].weight.float()  # (r, C, kh, kw), (N, r, 1, 1)
        return torch.einsum("nr,rckl->nckl", b[:, :, 0, 0], a) * self.scaling[adapter]


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, QuantConv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, QuantLinear):
        return module.in_features, module.out_features
    raise TypeError(f"not a qdiff quantized layer: {type(module).__name__}")


def lora_classes() -> dict[type[nn.Module], type[nn.Module]]:
    """PEFT's custom-module mapping: quantized layer type -> its LoRA layer type."""
    return {QuantLinear: QuantLoraLinear, QuantConv2d: QuantLoraConv2d}
