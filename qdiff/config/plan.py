"""A Plan: the bit-width chosen for every layer (the allocator's output, ``qdiff quantize --plan``'s input)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qdiff.errors import QdiffError

PLAN_VERSION = 1
_W_BITS = (2, 3, 4, 8)
_A_BITS = (4, 8)


@dataclass(frozen=True)
class LayerBits:
    """Bits for one layer; ``None`` keeps that tensor in floating point (w_bits=None: layer not quantized)."""

    w_bits: int | None
    a_bits: int | None = 8

    def __post_init__(self) -> None:
        if self.w_bits is not None and self.w_bits not in _W_BITS:
            raise QdiffError(f"plan: w_bits must be one of {_W_BITS} or null, got {self.w_bits!r}")
        if self.a_bits is not None and self.a_bits not in _A_BITS:
            raise QdiffError(f"plan: a_bits must be one of {_A_BITS} or null, got {self.a_bits!r}")


@dataclass(frozen=True)
class Plan:
    """Per-layer bit-widths keyed by the layer's qualified name inside the denoiser."""

    layers: Mapping[str, LayerBits]
    meta: Mapping[str, Any] = field(default_factory=dict)  # budget, objective, solver status, ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "qdiff-plan",
            "version": PLAN_VERSION,
            "meta": dict(self.meta),
            "layers": {k: {"w_bits": v.w_bits, "a_bits": v.a_bits} for k, v in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        if not isinstance(data, dict) or data.get("format") != "qdiff-plan":
            raise QdiffError(f'{source}: not a qdiff plan (missing "format": "qdiff-plan")')
        if data.get("version") != PLAN_VERSION:
            raise QdiffError(
                f"{source}: unsupported plan version {data.get('version')!r} (this qdiff reads {PLAN_VERSION})"
            )
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise QdiffError(f'{source}: "layers" must be a mapping of layer name to bits')
        out = {}
        for name, bits in layers.items():
            if not isinstance(bits, dict) or set(bits) - {"w_bits", "a_bits"}:
                raise QdiffError(f"{source}: layers.{name}: expected {{w_bits, a_bits}}, got {bits!r}")
            out[name] = LayerBits(bits.get("w_bits"), bits.get("a_bits"))
        return cls(out, data.get("meta") or {})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise QdiffError(f"plan {path}: cannot read ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise QdiffError(f"plan {path}: not valid JSON (line {exc.lineno})") from None
        return cls.from_dict(data, source=f"plan {path}")
