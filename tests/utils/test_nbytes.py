"""qdiff.utils.nbytes: measured bytes against hand counts, per library layer type, from the libraries' formats.

Each expected count is written out from shapes and dtypes (bytes per element times elements), never by calling the
counter under test. The peer-library cases skip only when that library is not installed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

from qdiff.utils.nbytes import held_tensors, module_nbytes, nbytes, storage_nbytes

F32, I8, U8 = 4, 1, 1


class Pair(torch.Tensor):
    """A minimal wrapper subclass (like torchao / quanto tensors): two inner tensors, no storage of its own."""

    @staticmethod
    def __new__(cls, a: torch.Tensor, b: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, a.shape, dtype=torch.float32)

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b

    def __tensor_flatten__(self):
        return ["a", "b"], None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return Pair(inner["a"], inner["b"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter(pair) detaches
            return Pair(args[0].a, args[0].b)
        unwrap = lambda t: t.a.float() * t.b if isinstance(t, Pair) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


class State:
    """Library state hung on a module as a plain attribute (like bitsandbytes' QuantState)."""

    def __init__(self, absmax: torch.Tensor, nested: State | None = None) -> None:
        self.absmax, self.nested, self.name = absmax, nested, "state"


def test_plain_module_matches_parameters_and_buffers():
    m = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32))
    # Linear 32x64 + 32 bias; BatchNorm weight, bias, running mean, running var (f32) + num_batches_tracked (i64)
    assert module_nbytes(m) == (32 * 64 + 32) * F32 + 4 * 32 * F32 + 8


def test_shared_storage_views_and_ties_count_once():
    base = torch.zeros(100)
    m = nn.Module()
    m.register_buffer("first", base[:60])
    m.register_buffer("second", base[40:])  # overlaps [40, 60)
    m.register_buffer("strided", base[::10])  # inside the range already counted
    assert module_nbytes(m) == 100 * F32
    tied = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert module_nbytes(tied) == 64 * F32
    assert nbytes(tied, tied[0]) == 64 * F32  # across objects too
    assert storage_nbytes([torch.zeros(3, 4).t()]) == 12 * F32  # non-contiguous: the span it covers


def test_wrapper_subclass_is_flattened_recursively():
    inner = Pair(torch.zeros(16, 8, dtype=torch.int8), torch.ones(16, 1))
    outer = Pair(inner, torch.ones(16, 1))  # nested subclass, like quanto's WeightQBitsTensor(PackedTensor)
    lin = nn.Linear(8, 16)
    lin.weight = nn.Parameter(outer, requires_grad=False)
    with pytest.raises(Exception):  # noqa: B017 - what the old counter hit
        outer.untyped_storage().data_ptr()
    assert module_nbytes(lin) == 16 * 8 * I8 + 16 * F32 + 16 * F32 + 16 * F32  # codes, 2 scales, bias
    assert {type(t) for t in held_tensors(lin)} == {torch.Tensor, nn.Parameter}  # codes, scales; bias


def test_plain_attribute_state_counted_and_module_references_not():
    lin = nn.Linear(4, 4, bias=False)
    lin.state = State(torch.zeros(10), State(torch.zeros(3, dtype=torch.float64)))
    lin.friends = [torch.zeros(2, dtype=torch.int8), {"k": torch.zeros(5, dtype=torch.uint8)}]
    lin.weight.extra = torch.zeros(6)  # state kept on the tensor object (bitsandbytes Int8Params.SCB style)
    object.__setattr__(lin, "other", nn.Linear(100, 100))  # a referenced module, not a child: not held
    assert module_nbytes(lin) == 16 * F32 + 10 * F32 + 3 * 8 + 2 * I8 + 5 * U8 + 6 * F32
    assert module_nbytes(nn.Linear(4, 4, device="meta")) == 0


# ---- bitsandbytes --------------------------------------------------------------------------------------------
def _bnb():
    pytest.importorskip("bitsandbytes")
    from qdiff.utils.lazy_imports import import_bitsandbytes

    return import_bitsandbytes()


def test_bnb_linear4bit_nf4_double_quant():
    bnb = _bnb()
    n, k = 64, 64
    lin = nn.Linear(k, n)
    m = bnb.nn.Linear4bit(k, n, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    m.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=64, compress_statistics=True,
                                 quant_type="nf4", module=m)  # fmt: skip
    m.bias = nn.Parameter(lin.bias.data)
    m.support_avx512bf16_for_cpu = False  # keep the documented layout (the CPU repack changes it)
    m = m.to("cpu")  # quantizes
    # packed 4-bit codes N*K/2 uint8; absmax per 64-weight block, double-quantized to uint8; the 16-entry NF4 code
    # (f32); the absmax offset (f32 scalar); nested state: absmax per 256 absmax values (f32) and its 256-entry
    # dynamic code (f32); bias
    blocks = n * k // 64
    expected = (n * k // 2) * U8 + blocks * U8 + 16 * F32 + F32 + -(-blocks // 256) * F32 + 256 * F32 + n * F32
    assert module_nbytes(m) == expected
    with torch.no_grad():
        m(torch.randn(2, k))
    assert module_nbytes(m) == expected


def test_bnb_linear8bitlt_cb_scb():
    bnb = _bnb()
    n, k = 64, 64
    lin = nn.Linear(k, n)
    m = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False, threshold=6.0)
    m.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
    m.bias = nn.Parameter(lin.bias.data)
    m = m.to("cpu")
    expected = n * k * I8 + n * F32 + n * F32  # CB (int8 rows, shares weight.data), SCB (f32 row absmax), bias
    assert module_nbytes(m) == expected
    with torch.no_grad():
        m(torch.randn(2, k))  # moves CB / SCB from the weight onto m.state
    assert m.weight.CB is None and m.state.SCB is not None
    assert module_nbytes(m) == expected


# ---- optimum-quanto -------------------------------------------------------------------------------------------
def test_quanto_qint8_and_qint4_weights():
    quanto = pytest.importorskip("optimum.quanto")
    n = 64
    m = nn.Sequential(nn.Linear(64, n), nn.Linear(256, n))
    quanto.quantize(m, weights=quanto.qint8, include=["0"])
    quanto.quantize(m, weights=quanto.qint4, include=["1"])
    quanto.freeze(m)
    scalars = 2 * F32  # QModuleMixin's input_scale / output_scale buffers (f32 scalars)
    # qint8: int8 codes N*K, one f32 scale per output row; bias
    assert module_nbytes(m[0]) == n * 64 * I8 + n * F32 + n * F32 + scalars
    # qint4, K=256 -> group size 128: two codes per byte, f32 scale and f32 shift per group; bias
    groups = n * 256 // 128
    assert module_nbytes(m[1]) == n * 256 // 2 * U8 + groups * F32 + groups * F32 + n * F32 + scalars
    assert module_nbytes(m) == module_nbytes(m[0]) + module_nbytes(m[1])


# ---- torchao ---------------------------------------------------------------------------------------------------
def test_torchao_int8_dynamic_and_int4_weight_only():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    n, k = 64, 64
    m = nn.Sequential(nn.Linear(k, n))
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
    # int8 codes N*K; per-row f32 scale and int8 zero-point; bias
    assert module_nbytes(m) == n * k * I8 + n * F32 + n * I8 + n * F32

    m = nn.Sequential(nn.Linear(k, n), nn.Conv2d(64, 32, 3))
    quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
              filter_fn=lambda mod, fqn: fqn in ("0", "1"))  # fmt: skip
    # int4 values one per byte (int8); per 32-group f32 scale and int8 zero-point; bias
    g = n * k // 32
    assert module_nbytes(m[0]) == n * k * I8 + g * F32 + g * I8 + n * F32
    # Conv2d (32, 64, 3, 3): groups of 32 input channels per kernel tap
    numel, g = 32 * 64 * 9, 32 * 64 * 9 // 32
    assert module_nbytes(m[1]) == numel * I8 + g * F32 + g * I8 + 32 * F32
