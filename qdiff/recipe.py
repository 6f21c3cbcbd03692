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

from qdiff.errors import QdiffError

WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (4, 8, 16)  # 16 = activations stay in floating point (W*A16)
GRANULARITIES = ("tensor", "channel", "group")
GROUP_SIZES = (32, 64, 128, 256)
WEIGHT_METHODS = ("minmax", "mse")
ACT_MODES = ("dynamic", "static")
OBSERVERS = ("minmax", "ema", "percentile", "mse")
KERNELS = ("auto", "triton", "torch")
SCHEDULER_NAMES = ("euler_a", "euler", "lcm", "tcd", "flow_euler", "ddim")  # see qdiff.models.schedulers
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")


def _fail(path: str, msg: str) -> QdiffError:
    return QdiffError(f"recipe: {path}: {msg}")


def _choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise _fail(path, f"got {value!r}, allowed values are {', '.join(map(repr, allowed))}")


def _positive(path: str, value: Any, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise _fail(path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class WeightConfig:
    """Weight quantizer: symmetric, per output channel by default (MixDQ)."""

    bits: int = 8
    granularity: str = "channel"  # tensor | channel | group (group-wise along K, Q-Sched's W4 base)
    group_size: int | None = None  # required for granularity=group
    method: str = "minmax"  # minmax | mse (per-row clip-ratio search)

    def __post_init__(self) -> None:
        self.validate("weights")

    def validate(self, path: str) -> None:
        _choice(f"{path}.bits", self.bits, WEIGHT_BITS)
        _choice(f"{path}.granularity", self.granularity, GRANULARITIES)
        _choice(f"{path}.method", self.method, WEIGHT_METHODS)
        if self.granularity == "group":
            _choice(f"{path}.group_size", self.group_size, GROUP_SIZES)
        elif self.group_size is not None:
            raise _fail(f"{path}.group_size", "only allowed with granularity: group")


@dataclass(frozen=True)
class ActivationConfig:
    """Activation quantizer at the input of every quantized Linear/Conv2d.

    ``dynamic``: symmetric per-token ranges computed on the fly (per-tensor for Conv2d).
    ``static``: asymmetric per-tensor ranges calibrated by running the sampler (MixDQ).
    """

    bits: int = 8
    mode: str = "dynamic"  # dynamic | static
    observer: str = "ema"  # static mode only: minmax | ema | percentile | mse
    momentum: float = 0.95  # EMA momentum (MixDQ uses 0.95)
    percentile: float = 99.99

    def __post_init__(self) -> None:
        self.validate("activations")

    def validate(self, path: str) -> None:
        _choice(f"{path}.bits", self.bits, ACT_BITS)
        _choice(f"{path}.mode", self.mode, ACT_MODES)
        _choice(f"{path}.observer", self.observer, OBSERVERS)
        if not 0.0 <= self.momentum < 1.0:
            raise _fail(f"{path}.momentum", f"must be in [0, 1), got {self.momentum!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise _fail(f"{path}.percentile", f"must be in (50, 100], got {self.percentile!r}")


@dataclass(frozen=True)
class SamplerConfig:
    """The few-step sampler used for calibration and as the default for generation."""

    steps: int = 4
    guidance_scale: float = 1.0
    height: int | None = None  # None = the pipeline's default resolution
    width: int | None = None
    seed: int = 0
    scheduler: str | None = None  # None = the pipeline's own; else swapped in (and saved with the export)
    timestep_spacing: str | None = None  # with scheduler: trailing | leading | linspace (None = its config's)

    def __post_init__(self) -> None:
        self.validate("sampler")

    def validate(self, path: str) -> None:
        _positive(f"{path}.steps", self.steps)
        if self.scheduler is not None:
            _choice(f"{path}.scheduler", self.scheduler, SCHEDULER_NAMES)
        if self.timestep_spacing is not None:
            _choice(f"{path}.timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _positive(f"{path}.guidance_scale", self.guidance_scale, allow_zero=True)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise _fail(f"{path}.{name}", f"must be a positive multiple of 8, got {value!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Prompts for calibration (static activation ranges, later sensitivity and Q-Sched)."""

    prompts: str = "coco"  # a bundled prompt set name or a path to a .txt file (one prompt per line)
    num_prompts: int = 8
    batch_size: int = 4

    def __post_init__(self) -> None:
        self.validate("calibration")

    def validate(self, path: str) -> None:
        if not isinstance(self.prompts, str) or not self.prompts:
            raise _fail(f"{path}.prompts", "must be a prompt-set name or a file path")
        _positive(f"{path}.num_prompts", self.num_prompts)
        _positive(f"{path}.batch_size", self.batch_size)


SENSITIVITY_MODES = ("fast", "full")
FAST_PROXIES = ("local", "denoiser", "gain")
METRICS = ("ssim", "sqnr")


@dataclass(frozen=True)
class SensitivityConfig:
    """Per-layer sensitivity analysis (MixDQ's metric-decoupled sweep), see ``qdiff.calib.sensitivity``.

    ``full``: one full pipeline run per layer x bit-width x tensor kind (MixDQ). ``fast``: cached inputs
    scored by a proxy: ``local`` output SQNR of the layer, ``denoiser`` output SQNR on cached denoiser
    calls, or ``gain`` (local SQNR shifted by a per-layer local-to-output gain measured once per layer).
    """

    mode: str = "fast"  # fast | full
    proxy: str = "gain"  # fast mode only: local | denoiser | gain
    content_metric: str = "ssim"  # full mode, content group (cross-attention, feed-forward): ssim | sqnr
    quality_metric: str = "sqnr"  # full mode, quality group (everything else): ssim | sqnr
    w_bits_content: tuple[int, ...] = (2, 4, 8)  # candidate weight bits, content group (MixDQ)
    w_bits_quality: tuple[int, ...] = (4, 8)  # candidate weight bits, quality group (MixDQ)
    a_bits: tuple[int, ...] = (4, 8)  # candidate activation bits (16 = keep activations in floating point)
    num_prompts: int = 4  # prompts (one image each) per full-mode measurement
    fast_prompts: int = 2  # prompts whose per-layer inputs are cached for fast mode

    def __post_init__(self) -> None:
        self.validate("sensitivity")

    def validate(self, path: str) -> None:
        _choice(f"{path}.mode", self.mode, SENSITIVITY_MODES)
        _choice(f"{path}.proxy", self.proxy, FAST_PROXIES)
        _choice(f"{path}.content_metric", self.content_metric, METRICS)
        _choice(f"{path}.quality_metric", self.quality_metric, METRICS)
        for key in ("w_bits_content", "w_bits_quality", "a_bits"):
            values = getattr(self, key)
            if not values:
                raise _fail(f"{path}.{key}", "must list at least one bit-width")
            for i, b in enumerate(values):
                _choice(f"{path}.{key}[{i}]", b, ACT_BITS if key == "a_bits" else WEIGHT_BITS)
        _positive(f"{path}.num_prompts", self.num_prompts)
        _positive(f"{path}.fast_prompts", self.fast_prompts)


@dataclass(frozen=True)
class AllocationConfig:
    """Bit allocation by integer programming (``qdiff.calib.allocate``).

    Budgets are size-weighted average bits over the layers the plan may quantize (protected layers
    excluded): weights weighted by parameter count in *storage* bits (3-bit weights are stored in a
    nibble and cost 4), activations by input element count (16 = floating point).
    """

    w_budget: float = 8.0
    a_budget: float = 8.0
    joint: bool = True  # one program for both groups (normalised scores); false = MixDQ's separate groups
    content_weight: float = 0.5  # joint mode: weight of the content group's normalised loss (quality: 1 - it)

    def __post_init__(self) -> None:
        self.validate("allocation")

    def validate(self, path: str) -> None:
        for key in ("w_budget", "a_budget"):
            value = getattr(self, key)
            if not 1.0 <= value <= 16.0:
                raise _fail(f"{path}.{key}", f"must be in [1, 16] bits, got {value!r}")
        if not 0.0 <= self.content_weight <= 1.0:
            raise _fail(f"{path}.content_weight", f"must be in [0, 1], got {self.content_weight!r}")


QSCHED_PARAMETERISATIONS = ("ramp", "ramp4", "per_step")
QSCHED_OPTIMISERS = ("grid", "cmaes", "coordinate")


@dataclass(frozen=True)
class QSchedConfig:
    """Q-Sched: per-step scheduler coefficients fitted with the reference-free JAQ loss (``qdiff.sched``).

    Only the quantized model is sampled while fitting. ``budget`` counts image generations; the search
    is validated on ``heldout_prompts`` further prompts (other seeds) and keeps identity coefficients
    unless the held-out JAQ improves by more than ``min_gain``.
    """

    enabled: bool = False  # fit after quantizing (qdiff.quantize / qdiff quantize)
    parameterisation: str = "ramp"  # ramp (2 start values, ends 1; the reference) | ramp4 | per_step (2 per step)
    optimiser: str = "grid"  # grid (the reference) | cmaes | coordinate
    grid_size: int = 10  # points per axis (10x10 in the reference code, 50x50 in its published script)
    range_min: float = 0.8  # search box for every coefficient (the reference's [0.8, 1.2])
    range_max: float = 1.2
    budget: int | None = None  # image generations; None: the whole grid, or 20% of the grid's for other optimisers
    alignment: str = "open_clip:ViT-B-32:openai"  # scorer spec (qdiff.sched.scorers), higher = better
    quality: str = "pyiqa:clipiqa"
    k: float = 2.0  # JAQ = mean log(alignment) + k * mean quality
    log_alignment: bool = True
    prompts: str | None = None  # prompt set name or .txt path; None = calibration.prompts
    num_prompts: int = 8  # fitting prompts (the first ones of the set)
    heldout_prompts: int = 4  # validation prompts (the next ones of the set, other seeds)
    seed: int = 0  # image seeds (held-out: seed + 10000) and the optimiser's seed
    min_gain: float = 0.0  # held-out JAQ gain required to keep the fitted coefficients

    def __post_init__(self) -> None:
        self.validate("qsched")

    def validate(self, path: str) -> None:
        _choice(f"{path}.parameterisation", self.parameterisation, QSCHED_PARAMETERISATIONS)
        _choice(f"{path}.optimiser", self.optimiser, QSCHED_OPTIMISERS)
        _positive(f"{path}.grid_size", self.grid_size)
        if not 0.0 < self.range_min <= 1.0 <= self.range_max:
            raise _fail(f"{path}.range_min", f"need 0 < range_min <= 1 <= range_max, got {self.range_min!r}, "
                        f"{self.range_max!r}")  # fmt: skip
        if self.budget is not None:
            _positive(f"{path}.budget", self.budget)
        for key in ("alignment", "quality"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise _fail(f"{path}.{key}", "must be a scorer spec such as 'open_clip:ViT-B-32:PATH' or 'pyiqa:piqe'")
        _positive(f"{path}.k", self.k, allow_zero=True)
        _positive(f"{path}.num_prompts", self.num_prompts)
        _positive(f"{path}.heldout_prompts", self.heldout_prompts)
        _positive(f"{path}.min_gain", self.min_gain, allow_zero=True)
        if self.optimiser == "grid" and self.parameterisation != "ramp":
            raise _fail(f"{path}.optimiser", "grid searches the 2-value ramp only; use cmaes or coordinate")


TEXT_CLIP_MODES = ("none", "w8a8")
TEXT_T5_MODES = ("none", "nf4", "int8")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Optional text-encoder quantization (``qdiff.quant.text_encoders``), saved with the export.

    ``clip: w8a8``: qdiff's per-channel W8 / per-token dynamic A8 on every encoder Linear, BOS-aware (token 0
    skips the activation quantizer). ``t5: nf4 | int8``: bitsandbytes weight-only (optional extra ``qdiff[bnb]``).
    """

    clip: str = "none"  # none | w8a8
    t5: str = "none"  # none | nf4 | int8

    def __post_init__(self) -> None:
        self.validate("text_encoders")

    def validate(self, path: str) -> None:
        _choice(f"{path}.clip", self.clip, TEXT_CLIP_MODES)
        _choice(f"{path}.t5", self.t5, TEXT_T5_MODES)


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
    bos_aware: bool = False  # cross-attention K/V: token 0 skips the activation quantizer, FP weights (MixDQ)
    skip: tuple[str, ...] = ()  # extra layer-name patterns (fnmatch) kept in full precision
    quantize_protected: bool = False  # also quantize the adapter's protected layers (conv_in, conv_out, ...)
    kernel: str = "auto"  # auto | triton | torch
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _fail("name", "must be a non-empty string")
        _choice("kernel", self.kernel, KERNELS)

    # ---- dict / YAML round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skip"] = list(self.skip)
        out["sensitivity"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["sensitivity"].items()}
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
            raise _fail(path, "must not be null")
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(path, f"must be a list, got {type(value).__name__}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, f"must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {_type_name(tp)} at {path}")  # programming error


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(where, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise _fail(key, f"unknown key; allowed keys are {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)  # each section validates itself in __post_init__
