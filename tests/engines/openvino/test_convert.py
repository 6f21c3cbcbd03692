"""Single quantized layers through ``ov.convert_model`` and the CPU plugin: which kernels run, and how close.

Tolerance: one frozen layer on OpenVINO equals qdiff's exact reference to float32 accumulation order (measured
~1e-7 relative) when its activations are static (``FakeQuantize`` -> u8 x i8 kernel) or dynamic per token with the
plugin's dynamic-quantization group equal to K. The runtime precision of each MatMul / convolution is read from the
compiled model, so a pattern the plugin stops recognising fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

ov = pytest.importorskip("openvino")

from ov_layers import Holder, frozen_layer  # noqa: E402

from qdiff.engines.openvino.convert import (  # noqa: E402
    I4_MAX,
    I4_MIN,
    pack_i4,
    quiet_tracing,
    store_low_bits,
    unpack_i4,
    widen_for_int8_kernels,
)
from qdiff.engines.openvino.trace import traced_layers  # noqa: E402


def _convert(module: nn.Module, x: torch.Tensor):
    """The layer's OpenVINO model, traced as the exporter traces it."""
    with torch.no_grad(), traced_layers(module), quiet_tracing():
        model = ov.convert_model(module.eval(), example_input=(x,))
    return model


def _run(model, x: torch.Tensor, group: int = 0, precision: str = "f32"):
    config = {"INFERENCE_PRECISION_HINT": precision, "DYNAMIC_QUANTIZATION_GROUP_SIZE": group,
              "INFERENCE_NUM_THREADS": 1}  # fmt: skip
    compiled = ov.Core().compile_model(model, "CPU", config)
    y = torch.from_numpy(compiled(x.numpy())[0].copy())
    kinds = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("FullyConnected", "Convolution"):
            kinds[info["layerType"].astype(str)] = info["runtimePrecision"].astype(str)
    return y, kinds


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind,w_bits,split", [("linear", 8, None), ("linear", 4, None), ("conv", 8, None),
                                               ("conv", 4, None), ("conv", 8, 10)])  # fmt: skip
def test_static_layers_run_int8_and_match_the_reference(kind, w_bits, split):
    layer, x = frozen_layer(kind, w_bits, "static", None, split)
    wrapped = Holder(layer)
    with torch.no_grad():
        ref = wrapped(x)
    model = _convert(wrapped, x)
    assert store_low_bits(model) == (1 if w_bits == 4 else 0)  # 4-bit codes stored as i4 on disk
    assert widen_for_int8_kernels(model) == (1 if w_bits == 4 else 0)  # and int8 again for the int8 kernels
    y, kinds = _run(model, x)
    layer_type = "FullyConnected" if kind == "linear" else "Convolution"
    assert kinds[layer_type] in ("u8", "i8"), kinds
    assert _rel(y, ref) < 1e-5


def test_dynamic_linear_per_token_matches_the_reference_with_group_k():
    """qdiff's W8A8 dynamic per-token activations = the plugin's dynamic quantization with group size K."""
    layer, x = frozen_layer("linear", 8, "dynamic", None)
    wrapped = Holder(layer)
    with torch.no_grad():
        ref = wrapped(x)
        weight_only = x @ layer.dequantized_weight().T + layer.bias
    y, kinds = _run(_convert(wrapped, x), x, group=layer.in_features)
    assert _rel(y, ref) < 1e-5 < _rel(weight_only, ref)  # quantized at run time, as qdiff does
    y_off, _ = _run(_convert(wrapped, x), x, group=0)
    assert _rel(y_off, weight_only) < 1e-5  # group 0: float activations (what differs when K has no common group)


def test_group_wise_dynamic_4bit_codes_are_stored_as_int4_and_compile_with_a_bias():
    """The plugin's compressed-weight path (i4 + dynamic activations); a bias on a group-decompressed MatMul once
    failed to compile ("Check 'data.size() == OC'") unless the decompression ended with a Convert."""
    layer, x = frozen_layer("linear", 4, "dynamic", 24)
    wrapped = Holder(layer)
    model = _convert(wrapped, x)
    assert store_low_bits(model) == 1
    types = {op.get_output_element_type(0).get_type_name() for op in model.get_ordered_ops()
             if op.get_type_name() == "Constant"}  # fmt: skip
    assert "i4" in types and "i8" not in types
    y, kinds = _run(model, x, group=0)
    with torch.no_grad():
        weight_only = x @ layer.dequantized_weight().T + layer.bias
    assert kinds["FullyConnected"] == "i4"
    assert _rel(y, weight_only) < 1e-5


def test_int4_packing_round_trips_bit_exactly():
    rng = np.random.default_rng(0)
    for count in (1, 2, 7, 64, 1001):
        codes = rng.integers(I4_MIN, I4_MAX + 1, size=count, dtype=np.int8)
        packed = pack_i4(codes)
        assert packed.dtype == np.uint8 and packed.size == (count + 1) // 2
        assert np.array_equal(unpack_i4(packed, count), codes)
    assert np.array_equal(pack_i4(np.array([1, -1], dtype=np.int8)), np.array([0xF1], dtype=np.uint8))  # low first


def test_eight_bit_codes_are_never_rewritten():
    layer, x = frozen_layer("linear", 8, "dynamic", None)
    model = _convert(Holder(layer), x)
    assert store_low_bits(model) == 0


def test_static_4bit_codes_on_disk_as_i4_run_int8_after_widening():
    """Without widening the plugin runs a FakeQuantize'd MatMul with i4 weights through its weight-decompression
    kernel (float activations: slower, same numbers; on Shapes W4A8-static every FullyConnected and 24 of 50
    convolutions); widened to int8 it runs u8 x i8."""
    layer, x = frozen_layer("linear", 4, "static", None)
    wrapped = Holder(layer)
    with torch.no_grad():
        ref = wrapped(x)
    model = _convert(wrapped, x)
    store_low_bits(model)
    y_i4, kinds_i4 = _run(model, x)
    assert kinds_i4["FullyConnected"] == "i4" and _rel(y_i4, ref) < 1e-5
    widen_for_int8_kernels(model)
    y, kinds = _run(model, x)
    assert kinds["FullyConnected"] == "u8" and _rel(y, ref) < 1e-5
