"""PackedWeight: the v1 layout written out by hand, round trips, shell shapes, code sums, measured bytes."""

from __future__ import annotations

import pytest
import torch

from qdiff.numerics.packed import PackedWeight


def _weight(n, k, gen):
    return torch.randn(n, k, generator=gen)


def _scale(w, bits, group_size=None):
    qmax = 2 ** (bits - 1) - 1
    if group_size is None:
        return w.abs().amax(1, keepdim=True) / qmax
    g = -(-w.shape[1] // group_size)
    cols = [w[:, i * group_size : (i + 1) * group_size].abs().amax(1) for i in range(g)]
    return torch.stack(cols, 1) / qmax


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group_size", [None, 32])
def test_quantize_matches_float64_reference_and_layout(gen, bits, group_size):
    n, k = 5, 75  # odd K: the last byte of a 4-bit row is half padding, 2-bit rows a quarter
    w = _weight(n, k, gen)
    scale = _scale(w, bits, group_size)
    pw = PackedWeight.quantize(w, scale, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    s_full = scale.double().repeat_interleave(group_size or k, dim=1)[:, :k]
    codes = torch.clamp(torch.round(w.double() / s_full), -qmax, qmax).to(torch.int8)
    assert torch.equal(pw.unpack(), codes)
    assert torch.allclose(pw.dequantize().double(), codes.double() * s_full, rtol=1e-6, atol=0)
    per = {8: 1, 4: 2, 3: 2, 2: 4}[bits]
    assert pw.codes.shape == (n, -(-k // per)) and pw.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    if per > 1:  # v1 layout: element k = per*j + i in field i of byte j (low bits first), two's complement
        field = 8 // per
        b = pw.codes[2, 3].item()
        for i in range(per):
            value = (b >> (field * i)) & ((1 << field) - 1)
            value -= (1 << field) if value >= 1 << (field - 1) else 0
            assert value == codes[2, per * 3 + i]
    assert pw.n == n and pw.k == k and pw.num_groups == (1 if group_size is None else 3)
    assert pw.nbytes() == pw.codes.numel() * pw.codes.element_size() + scale.numel() * 4


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 32), ("group", 64)])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_empty_has_the_quantized_shapes(gen, granularity, group_size, bits):
    n, k = 7, 99
    w = _weight(n, k, gen)
    if granularity == "tensor":
        scale = w.abs().amax().reshape(1, 1) / 7
    else:
        scale = _scale(w, bits, group_size)
    real = PackedWeight.quantize(w, scale, bits, group_size)
    shell = PackedWeight.empty(n, k, bits, granularity, group_size, device="meta")
    for a, b in ((real.codes, shell.codes), (real.scale, shell.scale)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert shell.codes.is_meta and shell.group_size == group_size and shell.nbytes() == real.nbytes()


def test_code_sums_brute_force(gen):
    w = _weight(5, 75, gen)
    pw = PackedWeight.quantize(w, _scale(w, 4, 32), 4, 32)
    codes = pw.unpack()
    sums = pw.code_sums()
    for n in range(5):
        for g in range(3):
            assert int(sums[n, g]) == sum(int(v) for v in codes[n, g * 32 : (g + 1) * 32])
    pw8 = PackedWeight.quantize(w, _scale(w, 8), 8)
    assert torch.equal(pw8.code_sums()[:, 0], pw8.codes.int().sum(1))
    attached = PackedWeight(pw8.codes, pw8.scale, 8, 75, sums=torch.zeros(5, 1, dtype=torch.int32))
    assert torch.equal(attached.code_sums(), torch.zeros(5, 1, dtype=torch.int32))  # a cache, used as given


def test_view_copies_nothing_and_checks_shapes(gen):
    w = _weight(4, 16, gen)
    pw = PackedWeight.quantize(w, _scale(w, 8), 8)
    assert pw.unpack().data_ptr() == pw.codes.data_ptr()
    with pytest.raises(ValueError, match=r"4-bit codes for K=16 must be torch.uint8 \(N, 8\)"):
        PackedWeight(pw.codes, pw.scale, 4, 16)
    with pytest.raises(ValueError, match="weight scale must be"):
        PackedWeight(pw.codes, torch.ones(3, 1), 8, 16)
    with pytest.raises(ValueError, match="layout"):
        PackedWeight(pw.codes, pw.scale, 8, 16, layout="v9")
    with pytest.raises(ValueError, match="bits must be one of"):
        PackedWeight(pw.codes, pw.scale, 5, 16)


class _Copy:
    """A stand-in for a backend's prepacked copy: it holds the int8 codes (N, K) as given."""

    backend = "test"

    def __init__(self, codes: torch.Tensor) -> None:
        self.codes = codes

    def int8_codes(self) -> torch.Tensor:
        return self.codes.clone()

    def nbytes(self) -> int:
        return self.codes.nbytes

    def copy(self) -> _Copy:
        return _Copy(self.codes.clone())


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_released_codes_come_back_from_the_slot(gen, bits):
    from qdiff.numerics.packed import PrepackSlot

    n, k = 5, 75  # odd K: padding bits in the last byte of 4- and 2-bit rows
    w = _weight(n, k, gen)
    pw = PackedWeight.quantize(w, _scale(w, bits), bits)
    slot = PrepackSlot()
    kept = PackedWeight(pw.codes, pw.scale, bits, k, slot=slot)
    assert not kept.released and not kept.equals_slot()  # nothing prepacked yet
    slot.value = _Copy(pw.unpack())
    assert kept.equals_slot() and not kept.released  # the layer still holds its codes
    released = PackedWeight(torch.empty_like(pw.codes, device="meta"), pw.scale, bits, k, slot=slot)
    assert released.released and released.device == pw.scale.device
    assert torch.equal(released.unpack(), pw.unpack()) and torch.equal(released.stored_codes(), pw.codes)
    assert torch.equal(released.dequantize(), pw.dequantize()) and torch.equal(released.code_sums(), pw.code_sums())
    assert released.nbytes() == pw.nbytes()  # the stored layout's bytes, whatever holds them
    if bits != 8:  # a stray padding bit in the stored bytes: the copy cannot give those bytes back
        odd = pw.codes.clone()
        odd[0, -1] |= 0x80
        assert not PackedWeight(odd, pw.scale, bits, k, slot=slot).equals_slot()
    if bits == 3:  # a stored nibble outside the 3-bit range: not repackable, not equal (no error)
        wide = PackedWeight(pw.codes, pw.scale, bits, k, slot=slot)
        slot.value = _Copy(torch.full((n, k), 7, dtype=torch.int8))
        assert not wide.equals_slot()
