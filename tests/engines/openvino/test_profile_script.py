"""scripts/openvino_profile.py's quantizer hoisting (the experiment docs/openvino.md quotes): a per-tensor
FakeQuantize moved above Reshape / Transpose gives the same codes (its dequantized values to the plugin's rounding,
1 ulp); per-channel ones and shared inputs stay."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script

ov = pytest.importorskip("openvino")
ops = pytest.importorskip("openvino.opset13")

hoist_fake_quantize = load_script("openvino_profile").hoist_fake_quantize


def _fq(x, low, high):
    lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
    return ops.fake_quantize(x, lo, hi, lo, hi, 256)


def _model(per_channel: bool = False, shared: bool = False):
    """x (2, 3, 8) -> Transpose -> Reshape (2, 24) -> FakeQuantize [-> + x's reshape when ``shared``]."""
    x = ops.parameter([2, 3, 8], np.float32, name="x")
    t = ops.transpose(x, ops.constant(np.array([0, 2, 1], np.int64)))
    r = ops.reshape(t, ops.constant(np.array([2, 24], np.int64)), False)
    if per_channel:
        lo, hi = ops.constant(np.linspace(-2, -1, 24, dtype=np.float32)), ops.constant(np.float32(1.5))
        q = ops.fake_quantize(r, lo, hi, lo, hi, 256)
    else:
        q = _fq(r, -1.7, 2.1)
    out = ops.add(q, r) if shared else q
    return ov.Model([out], [x])


def _run(model, x):
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({"x": x})[compiled.outputs[0]]


def _fq_parent(model) -> str:
    (fq,) = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    return fq.input_value(0).get_node().get_type_name()


def test_per_tensor_quantizer_moves_above_the_layout_ops_and_computes_the_same():
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32) * 1.5
    model = _model()
    before = _run(model, x)
    assert _fq_parent(model) == "Reshape"
    assert hoist_fake_quantize(model) == 1
    assert _fq_parent(model) == "Parameter"
    after = _run(model, x)
    step = np.float32((2.1 + 1.7) / 255)
    np.testing.assert_array_equal(np.rint((after + 1.7) / step), np.rint((before + 1.7) / step))  # the same codes
    np.testing.assert_allclose(after, before, rtol=0, atol=4 * np.finfo(np.float32).eps * 2.1)


@pytest.mark.parametrize("kind", ["per_channel", "shared"])
def test_per_channel_quantizers_and_shared_chains_stay(kind):
    model = _model(per_channel=kind == "per_channel", shared=kind == "shared")
    assert hoist_fake_quantize(model) == 0
    assert _fq_parent(model) == "Reshape"
