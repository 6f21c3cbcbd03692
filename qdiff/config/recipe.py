"""Recipes: a frozen, validated description of how to quantize a pipeline.

A recipe is YAML on disk and a tree of frozen dataclasses in memory. Every section validates its
fields at construction; errors name the key path (``weights.bits``) and the allowed values.

Example (``recipes/w8a8.yaml``)::

    name: w8a8
    weights: {bits: 8, granularity: channel, method: minmax}
    activations: {bits: 8, mode: dynamic}
    sampler: {steps: 4, guidance_scale: 1.0, height: 64, width: 64, seed: 0}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qdiff.config.loras import LoraFile
from qdiff.config.sections import (  # sections are part of the recipe API: re-exported here
    KERNELS,
    ActivationConfig,
    AllocationConfig,
    CalibrationConfig,
    QSchedConfig,
    SamplerConfig,
    SensitivityConfig,
    TextEncoderConfig,
    WeightConfig,
    choice,
    fail,
)
from qdiff.errors import QdiffError


@dataclass(frozen=True)
class Recipe:
    """How to quantize a pipeline. Load with :meth:`Recipe.load` (name or path) or build in Python."""

    name: str = "custom"
    model: str | None = None  # default model spec (path, hub id or builtin:NAME); the CLI's --model overrides
    weights: WeightConfig = field(default_factory=WeightConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    qsched: QSchedConfig = field(default_factory=QSchedConfig)
    text_encoders: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    loras: tuple[LoraFile, ...] = ()  # LoRA files fused into the float weights first (qdiff.config.loras)
    bos_aware: bool = False  # cross-attention K/V: token 0 skips the activation quantizer, FP weights (MixDQ)
    skip: tuple[str, ...] = ()  # extra layer-name patterns (fnmatch) kept in full precision
    quantize_protected: bool = False  # also quantize the adapter's protected layers (conv_in, conv_out, ...)
    kernel: str = "auto"  # auto | triton | torch
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise fail("name", "must be a non-empty string")
        choice("kernel", self.kernel, KERNELS)

    # ---- dict / YAML round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skip"] = list(self.skip)
        out["loras"] = [dict(entry) for entry in out["loras"]]
        out["sensitivity"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["sensitivity"].items()}
        out["qsched"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["qsched"].items()}
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        return _build(cls, data, path="")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, name_or_path: str | Path) -> Recipe:
        """Load a bundled recipe by name (``w8a8``) or a YAML file by path."""
        path = resolve_recipe_path(name_or_path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise QdiffError(f"recipe {path}: not valid YAML{where}") from None
        except OSError as exc:
            raise QdiffError(f"recipe {path}: cannot read ({exc.strerror})") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    from importlib.resources import files

    return sorted(p.name[: -len(".yaml")] for p in files("qdiff.recipes").iterdir() if p.name.endswith(".yaml"))


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A path that exists, else a bundled recipe name; error lists the bundled names."""
    from importlib.resources import as_file, files

    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    name = str(name_or_path)
    resource = files("qdiff.recipes") / f"{name}.yaml"
    if resource.is_file():
        with as_file(resource) as p:
            return Path(p)
    raise QdiffError(
        f"recipe {name!r} not found: not a file and not a bundled recipe ({', '.join(bundled_recipes())})"
    )


# ---- strict typed construction --------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses; no silent casts."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail(path, "must not be null")
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(path, f"must be a list, got {type(value).__name__}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(path, f"must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(path, f"must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(path, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise fail(path, f"must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {_type_name(tp)} at {path}")  # programming error


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail(where, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise fail(key, f"unknown key; allowed keys are {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)  # each section validates itself in __post_init__
