"""The integer GEMM kernel (8- and 4-bit weights): exact int32 accumulation vs float64 matmuls, epilogue bit-exact.

Shapes are chosen against the 128x128x64 interpreter tile and the explicit 32x32x32 tile below so that M, N
and K leave ragged edge tiles (and several tiles per dimension); every output is poisoned before the run to
catch unwritten tiles.
"""

from __future__ import annotations

import pytest
import torch
from qdiff._kernels.gemm import gemm
from qdiff._kernels.tiles import Tile

from qdiff.numerics.primitives import pack_int4

SMALL = Tile(32, 32, 32, group_m=2, num_warps=1, num_stages=1)


def _ints(shape, lo, hi, gen):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)


def _poison(m, n, dtype, device, value):
    if dtype == torch.int32:
        return torch.full((m, n), value, dtype=dtype, device=device)
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


def _run(w_bits, qa, qw, k, a_scale, w_scale, dev, **kw):
    stored = qw if w_bits == 8 else pack_int4(qw)
    return gemm(qa.to(dev), stored.to(dev), a_scale.to(dev), w_scale.to(dev), k=k, w_bits=w_bits, **kw)


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("m,n,k,tile", [(70, 90, 200, None), (33, 47, 129, SMALL), (1, 16, 17, None)])
def test_raw_accumulator_is_exact(kdev, gen, w_bits, m, n, k, tile):
    qa = _ints((m, k), -128, 127, gen)
    qw = _ints((n, k), -7, 7, gen) if w_bits == 4 else _ints((n, k), -127, 127, gen)
    qa[0] = -128  # extreme row: largest magnitude sums
    expected = (qa.double() @ qw.double().t()).to(torch.int32)
    for poison in (123456789, -987654321):
        out = _poison(m, n, torch.int32, kdev, poison)
        acc = _run(w_bits, qa, qw, k, torch.ones(1), torch.ones(1, 1), kdev, raw_acc=True, tile=tile, out=out)
        assert torch.equal(acc.cpu(), expected)


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("group_size,k", [(64, 333), (128, 300), (32, 97)])
def test_raw_accumulator_groupwise_with_zero_point(kdev, gen, w_bits, group_size, k):
    """Per-group accumulation with a ragged last group, and the static zero-point folded through w_sum."""
    m, n = 45, 50
    qa = _ints((m, k), -128, 127, gen)
    qw = _ints((n, k), -8, 7, gen) if w_bits == 4 else _ints((n, k), -127, 127, gen)
    groups = -(-k // group_size)
    zp = torch.tensor([-37], dtype=torch.int32)
    w_sum = torch.stack([qw[:, g * group_size : (g + 1) * group_size].int().sum(1) for g in range(groups)], 1)
    expected = ((qa.double() - zp.double()) @ qw.double().t()).to(torch.int32)
    out = _poison(m, n, torch.int32, kdev, -1)
    acc = _run(
        w_bits, qa, qw, k, torch.ones(1), torch.ones(n, groups), kdev,
        group_size=group_size, a_zp=zp.to(kdev), w_sum=w_sum.to(kdev), raw_acc=True, out=out,
    )  # fmt: skip
    assert torch.equal(acc.cpu(), expected)


def _epilogue_reference(acc_groups, w_scale, a_scale, bias, out_dtype):
    """The reference epilogue (backends.reference.linear), in its order: sum_g f32(acc_g) * sw_g, * sa, + b, cast."""
    y = torch.zeros(acc_groups[0].shape, dtype=torch.float32)
    for g, acc in enumerate(acc_groups):
        y += acc.float() * w_scale[:, g].reshape(1, -1)
    y = y * a_scale.reshape(-1, 1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "w_bits,scales", [(8, "channel"), (8, "tensor"), (4, "channel"), (4, "group64"), (4, "group128")]
)
@pytest.mark.parametrize("has_bias", [True, False])
def test_fused_epilogue_bit_exact(kdev, gen, out_dtype, w_bits, scales, has_bias):
    m, n, k = 67, 80, 259  # odd K for int4
    qa = _ints((m, k), -127, 127, gen)
    qw = _ints((n, k), -7, 7, gen) if w_bits == 4 else _ints((n, k), -127, 127, gen)
    gs = {"group64": 64, "group128": 128}.get(scales)
    groups = -(-k // gs) if gs else 1
    w_scale = torch.rand(1 if scales == "tensor" else n, groups, generator=gen) * 1e-3 + 1e-5
    a_scale = torch.rand(m, generator=gen) * 0.1 + 1e-3
    bias = (torch.randn(n, generator=gen) * 0.5).to(out_dtype) if has_bias else None
    bounds = [(g * gs, min((g + 1) * gs, k)) for g in range(groups)] if gs else [(0, k)]
    acc_groups = [qa[:, a:b].double() @ qw[:, a:b].double().t() for a, b in bounds]
    expected = _epilogue_reference(acc_groups, w_scale.expand(n, groups), a_scale, bias, out_dtype)
    out = _poison(m, n, out_dtype, kdev, None)
    y = _run(
        w_bits, qa, qw, k, a_scale, w_scale, kdev, bias=None if bias is None else bias.to(kdev),
        group_size=gs, out_dtype=out_dtype, out=out, tile=SMALL if has_bias else None,
    )  # fmt: skip
    assert y.dtype == out_dtype
    assert torch.equal(y.cpu(), expected)  # NaN poison left anywhere also fails here
    exact = sum(a.double() * w_scale.expand(n, groups)[:, g].double() for g, a in enumerate(acc_groups))
    exact = exact * a_scale.double()[:, None] + (0 if bias is None else bias.double())
    assert torch.allclose(y.cpu().double(), exact, rtol=1e-2, atol=1e-6)  # and it is the right function


def test_bad_arguments_raise(kdev):
    qa = torch.zeros(4, 32, dtype=torch.int8, device=kdev)
    w8 = torch.zeros(8, 32, dtype=torch.int8, device=kdev)
    one, ones = torch.ones(1), torch.ones(1, 1)
    with pytest.raises(ValueError, match="activations must be int8"):
        gemm(qa.float(), w8, one, ones, k=32, w_bits=8)
    with pytest.raises(ValueError, match="4-bit weights must be packed uint8"):
        gemm(qa, torch.zeros(8, 32, dtype=torch.uint8, device=kdev), one, ones, k=32, w_bits=4)
    with pytest.raises(ValueError, match="8-bit weights must be int8"):
        gemm(qa, torch.zeros(8, 16, dtype=torch.uint8, device=kdev), one, ones, k=32, w_bits=8)
    with pytest.raises(ValueError, match="w_bits must be one of"):
        gemm(qa, torch.zeros(8, 8, dtype=torch.uint8, device=kdev), one, ones, k=32, w_bits=2)
    with pytest.raises(ValueError, match="needs w_sum"):
        gemm(qa, w8, one, torch.ones(8, 1), k=32, w_bits=8, a_zp=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="must divide group_size"):
        gemm(qa, w8, one, torch.ones(8, 2), k=32, w_bits=8, group_size=16, tile=SMALL)
