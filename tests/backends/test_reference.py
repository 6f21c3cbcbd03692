"""The torch reference's exact integer products: chunked float32 sums equal float64 integer math, extreme codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qdiff.backends.acts import ConvGeometry
from qdiff.backends.reference import exact_chunk, int_conv2d, int_gemm


@pytest.mark.parametrize("a_abs", [127, 255])  # dynamic symmetric / static asymmetric activation codes
def test_int_gemm_chunks_are_exact(a_abs, gen):
    k = 3 * exact_chunk(a_abs, 127) + 17  # four chunks, the last one ragged
    qa = torch.full((5, k), float(a_abs))
    qa[1] = -a_abs
    qa[2:] = torch.randint(-a_abs, a_abs + 1, (3, k), generator=gen).float()
    qw = torch.full((6, k), 127, dtype=torch.int8)
    qw[1] = -127
    qw[2:] = torch.randint(-127, 128, (4, k), generator=gen, dtype=torch.int8)
    got = int_gemm(qa, qw, a_abs, 127)
    want = qa.double() @ qw.double().t()
    assert abs(float(want.abs().max())) > 2**24  # beyond float32's exact integers: the chunks matter
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_int_gemm_single_chunk_stays_float32(gen):
    qa = torch.randint(-127, 128, (3, 64), generator=gen).float()
    qw = torch.randint(-127, 128, (4, 64), generator=gen, dtype=torch.int8)
    got = int_gemm(qa, qw, 127, 127)
    assert got.dtype == torch.float32 and torch.equal(got.double(), qa.double() @ qw.double().t())


@pytest.mark.parametrize("padding", [(1, 1), "same"])
def test_int_conv2d_channel_chunks_are_exact(padding, gen):
    c = 3 * (exact_chunk(255, 127) // 9) + 5  # four input-channel chunks of a 3x3 conv
    qa = torch.randint(-255, 256, (2, c, 5, 4), generator=gen).float()
    qa[0] = 255
    qw = torch.randint(-127, 128, (3, c, 3, 3), generator=gen, dtype=torch.int8)
    qw[0] = 127
    geom = ConvGeometry((3, c, 3, 3), (1, 1), padding, (1, 1))
    got = int_conv2d(qa, qw, geom, 255, 127)
    want = F.conv2d(qa.double(), qw.double(), padding=padding)
    assert float(want.abs().max()) > 2**24
    assert got.dtype == torch.float64 and torch.equal(got, want)
