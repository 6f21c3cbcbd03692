"""Which implementation runs a frozen layer: one declaration of the backends, selection rules, and a spy.

A backend is one module with a class following :class:`Backend` plus one line in :data:`BACKENDS` (priority
order; the torch reference last, as the fallback). Modules are imported lazily, on the first call that asks
about them: importing qdiff never imports Triton.

Selection for a call ``(op, x, packed weight, act spec)`` and a preference (the recipe's ``kernel``):

* ``"auto"`` — the first backend, in priority order, that runs on ``x.device`` without being asked by name and
  whose :meth:`Backend.supports` covers the call (Triton on CUDA; the reference otherwise).
* a backend name — that backend; a one-line :class:`~qdiff.errors.QdiffError` when it cannot run on the device
  at all (not installed, no CUDA, failed self-test). A call its ``supports`` does not cover (e.g. 2-bit weights,
  weight-only or split layers for Triton) runs on the reference: each backend's docstring lists what it covers.

:func:`recording` is the spy: inside the block every frozen call appends ``(backend name, op)`` to a list.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from qdiff.backends.acts import ActSpec, ConvGeometry
from qdiff.errors import QdiffError
from qdiff.numerics.packed import PackedWeight

log = logging.getLogger(__name__)

OPS = ("linear", "conv2d")
AUTO = "auto"
REFERENCE = "torch"

# The registration, in priority order: name -> "module:Class" (imported on first use). The exact torch reference
# stays last: it supports every call and is the fallback.
BACKENDS: tuple[tuple[str, str], ...] = (
    ("triton", "qdiff.backends.triton:TritonBackend"),
    ("cpu_int8", "qdiff.backends.cpu_int8:CpuInt8Backend"),  # oneDNN VNNI int8, behind its exactness gate
    (REFERENCE, "qdiff.backends.reference:ReferenceBackend"),
)


@runtime_checkable
class Backend(Protocol):
    """An implementation of the frozen ops. Optional: ``self_test() -> tuple[bool, str]`` (exactness gate).

    ``supports`` answers for a device the backend runs on (``device_error`` returned None); it must be cheap
    (called on every frozen call).
    """

    name: str

    def device_error(self, device: torch.device, requested: bool) -> str | None:
        """None when the backend runs on ``device``, else why not (``requested``: named by the user, not auto)."""

    def supports(self, op: str, x: Tensor, pw: PackedWeight, act: ActSpec, geom: ConvGeometry | None) -> bool:
        """True when this backend computes the call (op "linear" or "conv2d") exactly like the reference."""

    def linear(self, x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None) -> Tensor:
        """x (..., K) -> (..., N) in x's dtype."""

    def conv2d(self, x: Tensor, pw: PackedWeight, act: ActSpec, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
        """x (B, C, H, W) -> (B, N, Ho, Wo) in x's dtype, contiguous NCHW."""


_RECORD: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("qdiff_backend_record")


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """Spy: yields a list that receives ``(backend name, op)`` for each frozen call made inside the block."""
    calls: list[tuple[str, str]] = []
    token = _RECORD.set(calls)
    try:
        yield calls
    finally:
        _RECORD.reset(token)


class Registry:
    """Backends from a declaration ``((name, "module:Class" or a factory), ...)``, loaded and self-tested once."""

    def __init__(self, declaration: tuple[tuple[str, str | Callable[[], Backend]], ...]) -> None:
        names = [name for name, _ in declaration]
        if not names or names[-1] != REFERENCE or len(set(names)) != len(names) or AUTO in names:
            raise ValueError(f"a backend declaration needs unique names ending with {REFERENCE!r}, got {names}")
        self._specs = dict(declaration)
        self._loaded: dict[str, tuple[Backend | None, str]] = {}  # name -> (backend, or None + why it is out)

    @property
    def names(self) -> tuple[str, ...]:
        """Registered backend names, in priority order."""
        return tuple(self._specs)

    def preferences(self) -> tuple[str, ...]:
        """Every value the recipe's ``kernel`` may take."""
        return (AUTO, *self.names)

    def _make(self, name: str) -> Backend:
        """A fresh instance of the declared backend (its module imported on first use)."""
        spec = self._specs[name]
        if isinstance(spec, str):
            module, _, cls = spec.partition(":")
            spec = getattr(importlib.import_module(module), cls)
        return spec()

    def backend(self, name: str) -> tuple[Backend | None, str]:
        """(the backend, "") once imported and self-tested; (None, why) when its self-test failed."""
        if name not in self._loaded:
            backend = self._make(name)
            ok, why = backend.self_test() if hasattr(backend, "self_test") else (True, "")
            if not ok:
                log.warning("kernel %r skipped: self-test failed: %s", name, why)
            self._loaded[name] = (backend, "") if ok else (None, f"kernel {name!r} failed its self-test: {why}")
        return self._loaded[name]

    def describe(self, device: torch.device | str = "cpu") -> list[tuple[str, str]]:
        """(name, status) per backend on ``device``, in priority order: what ``auto`` can use here and why not.

        Runs the self-test of every backend that runs on the device (once per process), so ``qdiff inspect`` and
        ``qdiff bench`` can report the exactness gate's verdict."""
        dev = torch.device(device)
        out = []
        for name in self.names:
            why = self._make(name).device_error(dev, False)
            if why:
                out.append((name, f"not on {dev.type}: {why}"))
                continue
            backend, why = self.backend(name)
            if backend is None:
                out.append((name, f"off: {why}"))
            elif hasattr(backend, "self_test"):
                out.append((name, "on: exact on this machine (self-test passed)"))
            else:
                out.append((name, "on" + (" (exact reference, covers every layer)" if name == REFERENCE else "")))
        return out

    def check(self, preference: str) -> str:
        """``preference`` itself when it is ``auto`` or a registered name; a QdiffError naming the choices else."""
        if preference not in self.preferences():
            raise QdiffError(f"kernel: got {preference!r}, allowed values are {', '.join(self.preferences())}")
        return str(preference)

    def _usable(self, name: str, device: torch.device, requested: bool) -> tuple[Backend | None, str]:
        backend, why = self.backend(name)
        if backend is None:
            return None, why
        why = backend.device_error(device, requested) or ""
        return (None, why) if why else (backend, "")

    def resolve(self, preference: str, device: torch.device | str) -> str:
        """The backend that runs a covered layer on ``device``; QdiffError when a named one cannot run there."""
        dev = torch.device(device)
        if self.check(preference) != AUTO:
            backend, why = self._usable(preference, dev, requested=True)
            if backend is None:
                raise QdiffError(why)
            return preference
        return next(name for name in self.names if self._usable(name, dev, requested=False)[0] is not None)

    def select(self, op: str, x: Tensor, pw: PackedWeight, act: ActSpec, geom: ConvGeometry | None, preference: str):
        """The backend that runs this call (see the module docstring for the rules)."""
        if self.check(preference) != AUTO:
            backend, why = self._usable(preference, x.device, requested=True)
            if backend is None:
                raise QdiffError(why)
            candidates = [backend]
        else:
            candidates = [self._usable(name, x.device, requested=False)[0] for name in self.names]
        for backend in candidates:
            if backend is not None and backend.supports(op, x, pw, act, geom):
                return backend
        return self.backend(REFERENCE)[0]

    def dispatch(
        self,
        op: str,
        x: Tensor,
        pw: PackedWeight,
        act: ActSpec,
        bias: Tensor | None = None,
        geom: ConvGeometry | None = None,
        preference: str = AUTO,
    ) -> Tensor:
        """Run a frozen op: ``linear`` (x (..., K)) or ``conv2d`` (x (B, C, H, W), ``geom`` required)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        backend = self.select(op, x, pw, act, geom, preference)
        calls = _RECORD.get(None)
        if calls is not None:
            calls.append((backend.name, op))
        if op == "linear":
            return backend.linear(x, pw, act, bias)
        if geom is None:
            raise ValueError("conv2d needs its ConvGeometry")
        return backend.conv2d(x, pw, act, bias, geom)


# The process-wide registry: holds the imported backends and their self-test results (a per-process cache).
REGISTRY = Registry(BACKENDS)
dispatch = REGISTRY.dispatch
resolve = REGISTRY.resolve


def backend_names() -> tuple[str, ...]:
    """Registered backend names, in priority order (the recipe's ``kernel`` also takes ``"auto"``)."""
    return REGISTRY.names
