"""One resident copy per weight on cpu_int8: the layer releases its codes once the prepacked copy gives them back.

Every test compares with ``torch.equal`` against the same layer on the torch reference (or its state before the
first call): outputs before and after the release, the state dict, the fallback to the reference, ``.to()``,
``deepcopy``, ``load_state_dict`` and an export saved after running. The bytes are measured with the C allocator.
"""

from __future__ import annotations

import copy
import gc
import logging

import pytest
import torch
from torch import nn

from qdiff.backends import heap
from qdiff.backends import prepacked as pp
from qdiff.backends.cpu_int8 import onednn_available, prepacked_nbytes
from qdiff.backends.registry import REGISTRY, recording
from qdiff.config.layer import LayerQuant
from qdiff.numerics.primitives import compute_qparams
from qdiff.quant.modules import QuantLayer, quant_module_for

pytestmark = pytest.mark.skipif(
    not onednn_available() or REGISTRY.backend("cpu_int8")[0] is None,
    reason="cpu_int8 is off here (no oneDNN ops, or its exactness gate failed): nothing is prepacked",
)

W8 = {"w_bits": 8}
W4G = {"w_bits": 4, "granularity": "group", "group_size": 32}
CASES = [  # (layer kind, weights, activation mode, split)
    ("linear", W8, "dynamic", None),
    ("linear", W8, "static", None),
    ("linear", W4G, "dynamic", None),
    ("linear", W4G, "static", None),
    ("conv", W8, "dynamic", None),
    ("conv", W8, "static", None),
    ("conv", W4G, "dynamic", None),
    ("conv", W8, "static", 3),
    ("conv", W8, "dynamic", 3),
    ("conv", W4G, "static", 3),
]


def _ids(case) -> str:
    kind, w, mode, split = case
    return f"{kind}-W{w['w_bits']}{'g' if 'group_size' in w else ''}-{mode}{'-split' if split else ''}"


def _layer(case, gen: torch.Generator) -> tuple[QuantLayer, torch.Tensor]:
    """A frozen layer with cpu_int8 in ``auto`` and an input for it (K = 72 or 96: ragged last weight groups)."""
    kind, w, mode, split = case
    layer, x = (nn.Linear(96, 40), torch.randn(2, 5, 96, generator=gen)) if kind == "linear" else (
        nn.Conv2d(8, 12, 3, padding=1), torch.randn(2, 8, 6, 5, generator=gen))  # fmt: skip
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    m = quant_module_for(layer, LayerQuant(**w, a_bits=8, a_mode=mode, a_split=split))
    if m.qcfg.static_act:
        lo, hi = (torch.tensor([-2.0, -0.5]), torch.tensor([3.0, 1.0])) if split else (x.min() / 2, x.max() / 2)
        m.set_act_qparams(*compute_qparams(lo, hi, 8, symmetric=False))
    m.freeze()
    return m, x


def _run(m: QuantLayer, x: torch.Tensor, kernel: str = "auto") -> tuple[torch.Tensor, set[str]]:
    m.kernel = kernel
    with recording() as calls:
        y = m(x)
    m.kernel = "auto"
    return y, {name for name, _ in calls}


def _same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_released_layer_is_exact_and_gives_its_codes_back(case, gen):
    m, x = _layer(case, gen)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    weight = m.dequantized_weight()
    ref, ran = _run(m, x, "torch")
    assert ran == {"torch"} and not m.codes_released()
    y, ran = _run(m, x)  # first call: prepacks, then the layer checks the copy and releases its codes
    assert ran == {"cpu_int8"} and torch.equal(y, ref)
    assert m.codes_released() and m.qweight.is_meta and m.qweight.shape == state["qweight"].shape
    assert torch.equal(_run(m, x)[0], ref)  # the held copy, reused
    assert _same_state(m.state_dict(), state)  # codes rebuilt, same names, order, dtypes and bits
    assert torch.equal(m.dequantized_weight(), weight)
    y, ran = _run(m, x, "torch")  # fallback to the reference after the release: codes from the copy
    assert ran == {"torch"} and torch.equal(y, ref)
    assert m.codes_released()  # still one copy


def test_moves_copies_and_loads_keep_the_codes(gen):
    m, x = _layer(("conv", W8, "static", 3), gen)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _run(m, x, "torch")[0]
    _run(m, x)
    twin = copy.deepcopy(m)  # its own oneDNN weights (they cannot be deep-copied, only cloned)
    assert twin.codes_released() and _same_state(twin.state_dict(), state) and torch.equal(_run(twin, x)[0], ref)
    m.to(torch.bfloat16)  # a dtype cast leaves integer CPU tensors where they are: still released, same result
    assert m.codes_released() and m.w_scale.dtype == torch.float32
    assert torch.equal(_run(m, x.bfloat16())[0], _run(twin.to(torch.bfloat16), x.bfloat16(), "torch")[0])
    m.restore_codes()  # what a move to another device does first
    assert not m.codes_released() and m.prepack_slot.value is None and torch.equal(m.qweight, state["qweight"])
    _run(m, x)
    m.to(torch.float32)
    m.load_state_dict({"bias": state["bias"] * 2}, strict=False)  # codes and scales untouched: the copy stays
    assert m.codes_released()
    flipped = {**state, "qweight": -state["qweight"]}
    m.load_state_dict(flipped)  # new codes: never the stale copy
    assert not m.codes_released() and torch.equal(m.qweight, flipped["qweight"])
    assert torch.equal(_run(m, x)[0], _run(m, x, "torch")[0]) and m.codes_released()
    assert _same_state(m.state_dict(), flipped)
    moved = m.to("meta")  # another device: the codes are restored first, then moved
    assert moved.prepack_slot.value is None and moved.qweight.is_meta


def test_in_place_scale_edit_rebuilds_the_copy(gen):
    m, x = _layer(("linear", W4G, "dynamic", None), gen)
    _run(m, x)
    with torch.no_grad():
        m.w_scale.mul_(2.0)  # the prepacked copy carries its own scales: it must not be reused
    y, ran = _run(m, x)
    assert ran == {"cpu_int8"} and torch.equal(y, _run(m, x, "torch")[0]) and m.codes_released()


def test_a_copy_that_does_not_give_the_codes_back_keeps_them(gen, monkeypatch, caplog):
    m, x = _layer(("linear", W8, "dynamic", None), gen)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    monkeypatch.setattr(pp.OneDnnCodes, "int8_codes", lambda self: torch.zeros(40, 96, dtype=torch.int8))
    with caplog.at_level(logging.WARNING, logger="qdiff.quant.modules"):
        y, ran = _run(m, x)
    assert ran == {"cpu_int8"} and torch.equal(y, _run(m, x, "torch")[0])
    assert not m.codes_released() and m.prepack_slot.value is not None  # both copies, never a wrong one
    assert "does not give the codes back exactly" in caplog.text
    assert _same_state(m.state_dict(), state)


def _measured_call(m: QuantLayer, x: torch.Tensor) -> int:
    """C-heap bytes the first call leaves behind (activations and output freed)."""
    gc.collect()
    before = heap.in_use()
    with torch.no_grad():
        m(x)
    gc.collect()
    return heap.in_use() - before


@pytest.mark.skipif(heap.in_use() is None, reason="the C allocator's bytes in use cannot be read (not glibc)")
@pytest.mark.parametrize("w", [W8, {"w_bits": 4, "granularity": "group", "group_size": 64}], ids=["W8A8", "W4A8"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_one_resident_copy_measured(w, kind, gen):
    """The first call's net allocation is the prepacked copy minus the released codes: one copy, measured."""
    mk = (lambda: nn.Linear(2048, 1024)) if kind == "linear" else (lambda: nn.Conv2d(256, 1024, 3, padding=1))
    x = torch.randn(4, 2048) if kind == "linear" else torch.randn(1, 256, 4, 4)
    layers = []
    for _ in range(2):
        m = quant_module_for(mk(), LayerQuant(**w, a_bits=8))
        m.freeze()
        layers.append(m)
    _measured_call(layers[0], x)  # the first of a shape also creates oneDNN's primitives (kernel code)
    stored = layers[1].qweight.nbytes
    grown = _measured_call(layers[1], x)
    held = prepacked_nbytes(layers[1])
    codes = 2048 * 1024 if kind == "linear" else 256 * 9 * 1024  # int8, one byte per weight
    assert layers[1].codes_released() and stored == codes * w["w_bits"] // 8
    assert codes <= held < 1.15 * codes  # int8 codes; W4A8: + per-group scales and oneDNN's per-group compensation
    # two copies would have grown by `held`; oneDNN's tensors carry ~2 KB of bookkeeping each (one per W4A8 group)
    assert abs(grown - (held - stored)) < 0.05 * codes, (grown, held, stored)
    assert layers[1].nbytes() == held + sum(t.nbytes for t in (layers[1].w_scale, layers[1].bias))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_exports_after_running_on_cpu_int8_are_bit_identical(recipe, tmp_path, capsys):
    """In memory (qdiff.quantize) and loaded (qdiff.load): saved after running, the denoiser file is the same bytes;
    ``resident_bytes`` / ``qdiff inspect --resident`` show where the codes are, per backend."""
    from conftest import generate

    import qdiff
    from qdiff.cli import main
    from qdiff.eval.size import resident_bytes
    from qdiff.models.tiny import tiny_sd_pipeline
    from qdiff.quant.transform import quantized_layers

    def weights(folder) -> bytes:
        return (folder / "unet" / "qdiff.safetensors").read_bytes()

    pipe = qdiff.quantize(tiny_sd_pipeline(seed=3), recipe, progress=False)
    before = qdiff.save(pipe, tmp_path / "before")
    images = generate(pipe, seed=11, steps=1)
    layers = quantized_layers(pipe.unet).values()
    assert all(m.codes_released() for m in layers) and prepacked_nbytes(pipe.unet) > 0
    assert weights(qdiff.save(pipe, tmp_path / "after")) == weights(before)
    loaded = qdiff.load(before)
    assert torch.equal(generate(loaded, seed=11, steps=1), images)
    assert all(m.codes_released() for m in quantized_layers(loaded.unet).values())
    assert weights(qdiff.save(loaded, tmp_path / "again")) == weights(before)
    n = len(layers)
    on_int8, on_torch = resident_bytes(loaded.unet), resident_bytes(qdiff.load(before, kernel="torch").unet)
    assert on_torch.holders == {"stored codes": (n, on_torch.stored - on_torch.rest)}
    assert on_torch.in_memory == on_torch.stored and on_int8.stored == on_torch.stored
    assert list(on_int8.holders) == ["cpu_int8 prepacked"] and on_int8.holders["cpu_int8 prepacked"][0] == n
    assert main(["inspect", str(before), "--resident"]) == 0
    out = capsys.readouterr().out
    assert f"frozen calls: cpu_int8 x{n}" in out and f"weight codes held as cpu_int8 prepacked: {n} layers" in out
