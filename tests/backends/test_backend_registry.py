"""The backend registry: declaration, selection rules, forced-preference errors, self-test gate, spy, lazy import."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import qdiff.backends.triton as triton_backend
from qdiff.backends import registry
from qdiff.backends.acts import ActSpec
from qdiff.backends.reference import ReferenceBackend
from qdiff.backends.registry import Registry, recording
from qdiff.config.layer import LayerQuant
from qdiff.config.sections import KERNELS
from qdiff.errors import QdiffError
from qdiff.numerics.packed import PackedWeight
from qdiff.quant.modules import quant_module_for

REF = ("torch", "qdiff.backends.reference:ReferenceBackend")
NEEDS_CUDA = (
    "kernel 'triton' requested for a tensor on cpu: Triton needs CUDA "
    "(or TRITON_INTERPRET=1 for the CPU interpreter); use kernel 'auto' or 'torch'"
)


def test_recipe_kernels_are_auto_plus_registered_backends():
    """config may not import backends (layering): this keeps the recipe's list and the registration equal."""
    assert KERNELS == ("auto", *registry.backend_names())
    assert registry.backend_names()[-1] == "torch"  # the exact reference is the last resort
    for name in registry.backend_names():
        backend, why = registry.REGISTRY.backend(name)
        assert isinstance(backend, registry.Backend) and backend.name == name and why == ""


def test_resolve_rules(monkeypatch):
    resolve = registry.resolve
    # on CPU, auto = the int8 backend where its exactness gate passes on this machine, else the reference
    cpu_auto = "cpu_int8" if registry.REGISTRY.backend("cpu_int8")[0] is not None else "torch"
    assert resolve("torch", "cuda") == "torch"
    assert resolve("auto", "cpu") == cpu_auto
    assert resolve("auto", "cuda") == "triton"  # decided from the device type; no GPU needed
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("triton", "cpu") == "triton"  # the interpreter, only when asked for by name
    assert resolve("auto", "cpu") == cpu_auto
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(QdiffError) as err:
        resolve("triton", "cpu")
    assert str(err.value) == NEEDS_CUDA
    with pytest.raises(QdiffError, match=r"^kernel: got 'cutlass', allowed values are auto, triton, cpu_int8, torch$"):
        resolve("cutlass", "cpu")
    monkeypatch.setattr(triton_backend, "triton_available", lambda: False)
    assert resolve("auto", "cuda") == "torch"
    with pytest.raises(QdiffError, match=r"^kernel 'triton' requested but triton is not installed"):
        resolve("triton", "cuda")


def test_frozen_layer_forced_to_an_unusable_backend_raises_one_line(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = quant_module_for(nn.Linear(16, 4), LayerQuant())
    m.freeze()
    m.kernel = "triton"
    with pytest.raises(QdiffError) as err:
        m(torch.randn(2, 16))
    assert str(err.value) == NEEDS_CUDA
    m.qcfg = LayerQuant(w_bits=8, a_bits=None)  # even a layer Triton does not cover: the device is checked first
    with pytest.raises(QdiffError, match="Triton needs CUDA"):
        m(torch.randn(2, 16))


# ---- selection with fake backends ---------------------------------------------------------------------------------
class Fake:
    """Runs 8-bit linear layers only; ``cpu_ok`` says whether it runs on CPU (else it needs a 'gpu')."""

    def __init__(self, name: str, cpu_ok: bool = True, test_ok: bool = True) -> None:
        self.name, self.cpu_ok, self.test_ok, self.tests = name, cpu_ok, test_ok, 0

    def device_error(self, device, requested):
        return None if self.cpu_ok else f"kernel {self.name!r} needs a gpu"

    def supports(self, op, x, pw, act, geom):
        return op == "linear" and pw.bits == 8

    def linear(self, x, pw, act, bias):
        return ReferenceBackend().linear(x, pw, act, bias) + 0  # same numbers; the spy tells the runs apart

    def conv2d(self, x, pw, act, bias, geom):
        raise AssertionError("not supported")

    def self_test(self):
        self.tests += 1
        return self.test_ok, "" if self.test_ok else "int8 GEMM off by one"


def _call(bits: int = 8):
    w = torch.randn(4, 16)
    pw = PackedWeight.quantize(w, w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1), bits)
    return torch.randn(3, 16), pw, ActSpec()


@pytest.mark.parametrize("bits,expect", [(8, "fast"), (4, "torch")])
def test_auto_takes_the_first_backend_that_supports_the_call(bits, expect):
    reg = Registry((("slow_gpu", lambda: Fake("slow_gpu", cpu_ok=False)), ("fast", lambda: Fake("fast")), REF))
    x, pw, act = _call(bits)
    assert reg.select("linear", x, pw, act, None, "auto").name == expect
    assert reg.resolve("auto", "cpu") == "fast"
    with recording() as calls:
        y = reg.dispatch("linear", x, pw, act, preference="auto")
    assert calls == [(expect, "linear")]
    assert torch.equal(y, ReferenceBackend().linear(x, pw, act, None))


def test_named_backend_falls_back_to_reference_for_uncovered_calls_and_raises_for_devices():
    reg = Registry((("gpu", lambda: Fake("gpu", cpu_ok=False)), ("fast", lambda: Fake("fast")), REF))
    x, pw4, act = _call(4)
    assert reg.select("linear", x, pw4, act, None, "fast").name == "torch"  # 4-bit: not covered -> reference
    assert reg.select("linear", x, _call(8)[1], act, None, "fast").name == "fast"
    with pytest.raises(QdiffError, match=r"^kernel 'gpu' needs a gpu$"):
        reg.select("linear", x, pw4, act, None, "gpu")
    with pytest.raises(QdiffError, match=r"allowed values are auto, gpu, fast, torch$"):
        reg.check("torch_compile")


def test_failed_self_test_skips_the_backend_once_and_says_so(caplog):
    made: list[Fake] = []
    reg = Registry((("bad", lambda: made.append(Fake("bad", test_ok=False)) or made[-1]), REF))
    x, pw, act = _call(8)
    with caplog.at_level(logging.WARNING, logger="qdiff.backends.registry"):
        for _ in range(3):
            assert reg.select("linear", x, pw, act, None, "auto").name == "torch"
    assert len(made) == 1 and made[0].tests == 1  # imported and tested once per process (per registry)
    assert [r.getMessage() for r in caplog.records] == ["kernel 'bad' skipped: self-test failed: int8 GEMM off by one"]
    with pytest.raises(QdiffError, match=r"^kernel 'bad' failed its self-test: int8 GEMM off by one$"):
        reg.select("linear", x, pw, act, None, "bad")


def test_declaration_is_checked():
    for bad in ((("fast", lambda: Fake("fast")),), (REF, REF), (("auto", lambda: Fake("auto")), REF)):
        with pytest.raises(ValueError, match="unique names ending with 'torch'"):
            Registry(bad)
    with pytest.raises(ValueError, match="op must be one of"):
        Registry((REF,)).dispatch("matmul", *_call(8))


# ---- spy and lazy import ------------------------------------------------------------------------------------------
def test_spy_records_only_inside_its_block():
    reg = Registry((("fast", lambda: Fake("fast")), REF))
    x, pw, act = _call(8)
    reg.dispatch("linear", x, pw, act)  # outside any block: nowhere to record, no error
    with recording() as outer:
        reg.dispatch("linear", x, pw, act)
        with recording() as inner:
            reg.dispatch("linear", x, pw, act, preference="torch")
        reg.dispatch("linear", x, _call(4)[1], act)
    reg.dispatch("linear", x, pw, act)
    assert inner == [("torch", "linear")]
    assert outer == [("fast", "linear"), ("torch", "linear")]


def test_registry_import_and_cpu_resolution_do_not_import_triton():
    code = (
        "import sys\n"
        "from qdiff.backends import registry\n"
        "assert registry.resolve('auto', 'cpu') in ('cpu_int8', 'torch')  # cpu_int8 when its gate passes\n"
        "assert 'triton' not in sys.modules and 'qdiff._kernels' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_dispatch_compiles_without_graph_breaks():
    """Selection, the spy and the reference backend are plain Python that torch.compile traces through (no graph
    break per layer). The cpu_int8 backend (oneDNN ops behind a prepack cache) is not traceable yet: pinned off."""
    import torch._dynamo as dynamo

    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 25, 8))
    for i, cfg in ((0, LayerQuant(w_bits=4, granularity="group", group_size=12)), (2, LayerQuant(a_mode="static"))):
        net[i] = quant_module_for(net[i], cfg)
        if cfg.static_act:
            net[i].set_act_qparams(torch.tensor(0.05), torch.tensor(2))
        net[i].freeze()
        net[i].kernel = "torch"
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        dynamo.reset()
        assert dynamo.explain(net)(x).graph_break_count == 0
        assert torch.equal(torch.compile(net, backend="eager")(x), net(x))
    dynamo.reset()
