"""One pipeline component -> an OpenVINO model: traced, named, dynamic axes, 4-bit codes stored as 4-bit.

The quantized layers are traced through :mod:`qdiff.engines.openvino.trace` (int8 code constants, decompression,
FakeQuantize). :func:`store_low_bits` then rewrites every int8 weight-code constant whose values all fit in [-8, 7]
(qdiff's 4-bit and 3-bit codes) as an OpenVINO ``i4`` constant (two codes per byte, first in the low nibble): the
same numbers, half the bytes on disk. An 8-bit code tensor never fits (a min-max scale maps each row's or group's
largest weight to +-127), so the rule needs no bookkeeping of which layer had which bits, and it cannot change a value.

OpenVINO's low-precision transformations run a MatMul / convolution behind a ``FakeQuantize`` (static activations)
as u8 x i8 only with int8 weights; with ``i4`` weights they fall back to float (measured on Shapes W4A8-static: 74 vs
42 ms per UNet call, 24 of 50 convolutions in f32). qdiff's loader therefore widens exactly those constants back to
int8 in memory before compiling (:func:`widen_for_int8_kernels`): small on disk, int8 kernels at run time. Codes under
dynamic activations stay ``i4``: the plugin's compressed-weight kernels take them as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from qdiff.engines.openvino.components import Component
from qdiff.engines.openvino.trace import traced_layers

I4_MIN, I4_MAX = -8, 7


def to_openvino(component: Component):
    """``ov.Model`` of ``component``: inputs named and typed with their dynamic axes, outputs named, quantized layers
    in OpenVINO's int8 patterns, 4-bit codes as ``i4`` constants."""
    import openvino as ov

    examples = component.examples()
    inputs = [(ov.PartialShape(list(p.shape)), _ov_type(p.dtype)) for p in component.inputs]  # by position
    module = component.module.eval()
    with torch.no_grad(), traced_layers(module), quiet_tracing():
        # traced here, not by ov.convert_model: handed the nn.Module, its own tracing peaked at 15.6 GiB RSS for the
        # real-size SDXL UNet W8A8 export, against 6.4 GiB for this trace + conversion (measured)
        scripted = torch.jit.trace(module, examples, check_trace=False, strict=False)
        model = ov.convert_model(scripted, example_input=examples, input=inputs)
    del scripted
    for port, spec in zip(model.inputs, component.inputs):
        port.get_tensor().set_names({spec.name})
    if len(model.outputs) != len(component.outputs):
        got = len(model.outputs)
        raise RuntimeError(f"{component.folder}: traced {got} outputs, expected {len(component.outputs)}")
    for port, name in zip(model.outputs, component.outputs):
        port.get_tensor().set_names({name})
    for scope in component.keep_f32:
        keep_in_f32(model, scope)
    store_low_bits(model)
    return model


def keep_in_f32(model, scope: str) -> None:
    """Add the last op of module ``scope`` (e.g. ``time_proj``) as an extra output ``f32.<scope>``, which keeps
    it and its producers in f32 under bf16 inference (:mod:`qdiff.engines.openvino.components`, ``keep_f32``)."""
    ops = [op for op in model.get_ordered_ops() if f".{scope}/" in op.get_friendly_name()
           and op.get_type_name() not in ("Constant", "Result")]  # fmt: skip
    if not ops:
        raise RuntimeError(f"no traced op of {scope!r} to keep in f32")
    (port,) = model.add_outputs([ops[-1].output(0)])
    port.get_tensor().set_names({f"f32.{scope}"})


@contextmanager
def quiet_tracing() -> Iterator[None]:
    """Tracing a diffusers / transformers model warns on every shape-dependent Python branch (TracerWarning), on
    ``torch.jit.trace`` itself (deprecated) and, via transformers' ``loss_function`` property, about an unset loss;
    none of it is actionable for an export. The branches it names are constants in the traced graph: docs/openvino.md
    says which input sizes the folders take."""
    from qdiff.utils.lazy_imports import dropping_notices

    with warnings.catch_warnings(), dropping_notices(TRACE_NOTICES):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(torch\.jit\.trace|is_gradient_ch)")
        yield


TRACE_NOTICES = (("transformers.modeling_utils", "`loss_type=None` was set in the config"),)


def _ov_type(dtype: torch.dtype):
    import openvino as ov

    return {torch.float32: ov.Type.f32, torch.int64: ov.Type.i64}[dtype]


def store_low_bits(model) -> int:
    """Rewrite each int8 constant that feeds a ``Convert`` (a weight decompression) and whose values all fit in
    [-8, 7] as an ``i4`` constant; returns how many were rewritten."""
    import openvino as ov

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_output_element_type(0) != ov.Type.i8:
            continue
        targets = list(op.output(0).get_target_inputs())
        if not targets or any(t.get_node().get_type_name() != "Convert" for t in targets):
            continue
        codes = op.get_data()
        if codes.size == 0 or codes.min() < I4_MIN or codes.max() > I4_MAX:
            continue
        tensor = ov.Tensor(ov.Type.i4, ov.Shape(list(codes.shape)))
        np.copyto(tensor.data.reshape(-1), pack_i4(codes))
        _replace(op, targets, ov.op.Constant(tensor))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


def widen_for_int8_kernels(model) -> int:
    """Rewrite each ``i4`` weight constant whose layer's activation comes from a ``FakeQuantize`` as int8 (the same
    codes, one per byte), so the CPU plugin runs that layer's int8 kernel; returns how many were rewritten."""
    import openvino as ov

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_output_element_type(0) != ov.Type.i4:
            continue
        targets = list(op.output(0).get_target_inputs())
        if not targets or not all(_feeds_fake_quantized(t.get_node()) for t in targets):
            continue
        shape = list(op.get_output_shape(0))
        packed = op.get_data().view(np.uint8).reshape(-1)  # an i4 constant's data: its packed bytes
        codes = unpack_i4(packed, int(np.prod(shape))).reshape(shape)
        _replace(op, targets, ov.op.Constant(codes))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


def _replace(old, targets, new) -> None:
    new.set_friendly_name(old.get_friendly_name())
    for target in targets:
        target.replace_source_output(new.output(0))


_DECOMPRESSION = ("Convert", "Multiply", "Subtract", "Reshape", "StridedSlice", "Slice", "Transpose")
_WEIGHTED = ("MatMul", "Convolution")
_LAYOUT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Pad")  # ops between a FakeQuantize and its consumer


def _feeds_fake_quantized(node, depth: int = 8) -> bool:
    """Whether the decompression chain starting at ``node`` reaches a MatMul / Convolution whose activation input
    comes from a ``FakeQuantize`` (a statically quantized layer)."""
    if node.get_type_name() in _WEIGHTED:
        return _fake_quantized(node.input_value(0).get_node())
    if depth == 0 or node.get_type_name() not in _DECOMPRESSION:
        return False
    return any(_feeds_fake_quantized(t.get_node(), depth - 1) for t in node.output(0).get_target_inputs())


def _fake_quantized(node, depth: int = 4) -> bool:
    """Whether an activation comes from ``FakeQuantize`` nodes only: directly, through layout ops, or as the
    ``Concat`` of quantized parts (a split input)."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if depth == 0:
        return False
    if kind == "Concat":
        return all(_fake_quantized(v.get_node(), depth - 1) for v in node.input_values())
    return kind in _LAYOUT and _fake_quantized(node.input_value(0).get_node(), depth - 1)


def pack_i4(codes: np.ndarray) -> np.ndarray:
    """int8 codes in [-8, 7], any shape -> uint8 bytes, element 2j in the low nibble of byte j, 2j+1 in the high one
    (OpenVINO's ``i4`` layout); an odd count is padded with a zero nibble."""
    flat = codes.reshape(-1).astype(np.int16) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_i4(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_i4`: the first ``count`` int8 codes."""
    nib = np.empty(packed.size * 2, dtype=np.int16)
    nib[0::2], nib[1::2] = packed & 0xF, packed >> 4
    return np.where(nib > 7, nib - 16, nib)[:count].astype(np.int8)
