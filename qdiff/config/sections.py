"""Recipe sections: one frozen dataclass per YAML section, each validating itself at construction.

Errors name the key path (``weights.bits``) and the allowed values; :mod:`qdiff.config.recipe` assembles
the sections into a :class:`~qdiff.config.recipe.Recipe` and reads/writes YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qdiff.config.bits import RECIPE_ACT_BITS, WEIGHT_BITS
from qdiff.errors import QdiffError

GRANULARITIES = ("tensor", "channel", "group")
GROUP_SIZES = (32, 64, 128, 256)
WEIGHT_METHODS = ("minmax", "mse")
ACT_MODES = ("dynamic", "static")
OBSERVERS = ("minmax", "ema", "percentile", "mse")
KERNELS = ("auto", "triton", "cpu_int8", "torch")  # the backend registry's names (a test keeps them equal)
SCHEDULER_NAMES = ("euler_a", "euler", "lcm", "tcd", "flow_euler", "ddim")  # see qdiff.models.schedulers
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
OFFLOAD_MODES = ("none", "model", "sequential")  # calibration.offload, see qdiff.calib.offload


def fail(path: str, msg: str) -> QdiffError:
    return QdiffError(f"recipe: {path}: {msg}")


def choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise fail(path, f"got {value!r}, allowed values are {', '.join(map(repr, allowed))}")


def positive(path: str, value: Any, allow_zero: bool = False) -> None:
    """A finite number > 0 (``allow_zero``: >= 0); NaN, Inf and booleans are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(path, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise fail(path, f"must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise fail(path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def increasing(path: str, values: Any, noun: str, allow_zero: bool = False, kind: str | None = None) -> None:
    """A tuple of increasing, distinct :func:`positive` numbers (``allow_zero`` as there); the errors call them
    ``noun`` ("radii must be increasing ...") and ``kind`` ("must be a list of ridge strengths"; default ``noun``)."""
    if not isinstance(values, tuple):
        raise fail(path, f"must be a list of {kind or noun}, got {values!r}")
    for i, v in enumerate(values):
        positive(f"{path}[{i}]", v, allow_zero)
    if list(values) != sorted(set(values)):
        raise fail(path, f"{noun} must be increasing and distinct, got {list(values)}")


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
        choice(f"{path}.bits", self.bits, WEIGHT_BITS)
        choice(f"{path}.granularity", self.granularity, GRANULARITIES)
        choice(f"{path}.method", self.method, WEIGHT_METHODS)
        if self.granularity == "group":
            choice(f"{path}.group_size", self.group_size, GROUP_SIZES)
        elif self.group_size is not None:
            raise fail(f"{path}.group_size", "only allowed with granularity: group")


@dataclass(frozen=True)
class ActivationConfig:
    """Activation quantizer at the input of every quantized Linear/Conv2d.

    ``dynamic``: symmetric per-token ranges computed on the fly (per-tensor for Conv2d).
    ``static``: asymmetric per-tensor ranges calibrated by running the sampler (MixDQ).
    ``split_skip``: with static activations, layers whose input concatenates two tensors (UNet up-block
    ``cat([up, skip])``) get one activation quantizer per part (Q-Diffusion's shortcut splitting). Dynamic
    activations are not split (their per-sample scales adapt already, and split layers have no Triton kernel).
    """

    bits: int = 8
    mode: str = "dynamic"  # dynamic | static
    observer: str = "ema"  # static mode only: minmax | ema | percentile | mse
    momentum: float = 0.95  # EMA momentum (MixDQ uses 0.95)
    percentile: float = 99.99
    split_skip: bool = True  # separate quantizers for the up-path and skip parts of a concatenated input

    def __post_init__(self) -> None:
        self.validate("activations")

    def validate(self, path: str) -> None:
        choice(f"{path}.bits", self.bits, RECIPE_ACT_BITS)
        choice(f"{path}.mode", self.mode, ACT_MODES)
        choice(f"{path}.observer", self.observer, OBSERVERS)
        if not 0.0 <= self.momentum < 1.0:
            raise fail(f"{path}.momentum", f"must be in [0, 1), got {self.momentum!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise fail(f"{path}.percentile", f"must be in (50, 100], got {self.percentile!r}")


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
        positive(f"{path}.steps", self.steps)
        if self.scheduler is not None:
            choice(f"{path}.scheduler", self.scheduler, SCHEDULER_NAMES)
        if self.timestep_spacing is not None:
            choice(f"{path}.timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        positive(f"{path}.guidance_scale", self.guidance_scale, allow_zero=True)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise fail(f"{path}.{name}", f"must be a positive multiple of 8, got {value!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Prompts for calibration (static activation ranges, later sensitivity and Q-Sched)."""

    prompts: str = "coco"  # a bundled prompt set name or a path to a .txt file (one prompt per line)
    num_prompts: int = 8
    batch_size: int = 4
    offload: str = "none"  # none | model | sequential: bounded-memory calibration (qdiff.calib.offload)

    def __post_init__(self) -> None:
        self.validate("calibration")

    def validate(self, path: str) -> None:
        if not isinstance(self.prompts, str) or not self.prompts:
            raise fail(f"{path}.prompts", "must be a prompt-set name or a file path")
        choice(f"{path}.offload", self.offload, OFFLOAD_MODES)
        positive(f"{path}.num_prompts", self.num_prompts)
        positive(f"{path}.batch_size", self.batch_size)


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
        choice(f"{path}.mode", self.mode, SENSITIVITY_MODES)
        choice(f"{path}.proxy", self.proxy, FAST_PROXIES)
        choice(f"{path}.content_metric", self.content_metric, METRICS)
        choice(f"{path}.quality_metric", self.quality_metric, METRICS)
        for key in ("w_bits_content", "w_bits_quality", "a_bits"):
            values = getattr(self, key)
            if not values:
                raise fail(f"{path}.{key}", "must list at least one bit-width")
            for i, b in enumerate(values):
                choice(f"{path}.{key}[{i}]", b, RECIPE_ACT_BITS if key == "a_bits" else WEIGHT_BITS)
        positive(f"{path}.num_prompts", self.num_prompts)
        positive(f"{path}.fast_prompts", self.fast_prompts)


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
                raise fail(f"{path}.{key}", f"must be in [1, 16] bits, got {value!r}")
        if not 0.0 <= self.content_weight <= 1.0:
            raise fail(f"{path}.content_weight", f"must be in [0, 1], got {self.content_weight!r}")


QSCHED_PARAMETERISATIONS = ("ramp", "ramp4", "per_step")
QSCHED_OPTIMISERS = ("grid", "cmaes", "coordinate")
# prompt families (qdiff.sched.families): Shapes caption attributes, or k-means clusters of text embeddings
QSCHED_FAMILIES = ("background", "colour", "size", "position", "shape", "template", "embedding")


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
    # Reference-free guards against scorer hacking (qdiff.sched.guard; docs/qsched.md "Guards"):
    alignment_weight: float = 1.0  # weight of the log-alignment term in JAQ (0 = quality only: an ablation)
    features: str = "none"  # anchor/guard image features: none | pixels | shapes-clip | shapes-classifier | ...
    anchor_weight: float = 0.0  # JAQ - w * FD(features, un-scheduled images' features) / tr(cov) on the fit prompts
    trust_radius: tuple[float, ...] = ()  # |c - 1| <= r; several radii: the best on validation is kept
    guard: bool = False  # keep the plain scheduler when validation images drift from the un-scheduled distribution
    guard_tolerance: float = 0.0  # allowed drift ratio above 1 (FD to a second un-scheduled draw, vs identity's)
    # Per-family validation (issue 25; qdiff.sched.family_fit, docs/qsched.md "Prompt families"):
    families: tuple[str, ...] = ()  # attributes that split the prompts into families; () = off (pooled guard)
    family_clusters: int = 4  # k-means clusters for families: [embedding]
    validation_seeds: int = 1  # seeds per validation prompt (the bootstrap resamples prompts and seeds)
    confidence: float = 0.95  # bootstrap interval level of the per-family test
    bootstrap: int = 1000  # bootstrap replicates
    family_tolerance: float = 0.0  # allowed FD-proxy increase per family, as a fraction of its noise floor
    shrinkage: tuple[float, ...] = ()  # ridge strengths toward identity, chosen by cross-validation over families
    cv_folds: int = 3  # folds of the first family attribute's families for that cross-validation
    reference_steps: int | None = None  # steps of the un-scheduled reference/anchor draws (None: the sampler's own)

    def __post_init__(self) -> None:
        self.validate("qsched")

    def validate(self, path: str) -> None:
        choice(f"{path}.parameterisation", self.parameterisation, QSCHED_PARAMETERISATIONS)
        choice(f"{path}.optimiser", self.optimiser, QSCHED_OPTIMISERS)
        positive(f"{path}.grid_size", self.grid_size)
        if not 0.0 < self.range_min <= 1.0 <= self.range_max:
            raise fail(f"{path}.range_min", f"need 0 < range_min <= 1 <= range_max, got {self.range_min!r}, "
                        f"{self.range_max!r}")  # fmt: skip
        if self.budget is not None:
            positive(f"{path}.budget", self.budget)
        for key in ("alignment", "quality"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise fail(f"{path}.{key}", "must be a scorer spec such as 'open_clip:ViT-B-32:PATH' or 'pyiqa:piqe'")
        positive(f"{path}.k", self.k, allow_zero=True)
        positive(f"{path}.num_prompts", self.num_prompts)
        positive(f"{path}.heldout_prompts", self.heldout_prompts)
        positive(f"{path}.min_gain", self.min_gain, allow_zero=True)
        if self.optimiser == "grid" and self.parameterisation != "ramp":
            raise fail(f"{path}.optimiser", "grid searches the 2-value ramp only; use cmaes or coordinate")
        positive(f"{path}.alignment_weight", self.alignment_weight, allow_zero=True)
        if not isinstance(self.features, str) or not self.features:
            raise fail(f"{path}.features", "must be 'none' or a feature spec such as 'pixels' or 'shapes-clip'")
        positive(f"{path}.anchor_weight", self.anchor_weight, allow_zero=True)
        if self.features == "none" and (self.anchor_weight > 0 or self.guard):
            raise fail(f"{path}.features", "anchor_weight > 0 and guard need image features (e.g. 'shapes-clip')")
        increasing(f"{path}.trust_radius", self.trust_radius, "radii")
        if not isinstance(self.guard, bool):
            raise fail(f"{path}.guard", f"must be true or false, got {self.guard!r}")
        positive(f"{path}.guard_tolerance", self.guard_tolerance, allow_zero=True)
        self._validate_families(path)

    def _validate_families(self, path: str) -> None:
        if not isinstance(self.families, tuple):
            raise fail(f"{path}.families", f"must be a list of attributes, got {self.families!r}")
        for i, f in enumerate(self.families):
            choice(f"{path}.families[{i}]", f, QSCHED_FAMILIES)
        if len(set(self.families)) != len(self.families):
            raise fail(f"{path}.families", f"attributes must be distinct, got {list(self.families)}")
        if self.families and self.features == "none":
            raise fail(f"{path}.features", "families need image features for the per-family test (e.g. 'shapes-clip')")
        for key in ("family_clusters", "validation_seeds", "bootstrap", "cv_folds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(f"{path}.{key}", f"must be an integer, got {value!r}")
            positive(f"{path}.{key}", value)
        if self.reference_steps is not None:
            if isinstance(self.reference_steps, bool) or not isinstance(self.reference_steps, int):
                raise fail(f"{path}.reference_steps", f"must be an integer or null, got {self.reference_steps!r}")
            positive(f"{path}.reference_steps", self.reference_steps)
            if self.features == "none":
                raise fail(f"{path}.reference_steps", "reference images are compared in image features: set features")
        if self.heldout_prompts * self.validation_seeds > 10_000:
            raise fail(f"{path}.validation_seeds", "heldout_prompts x validation_seeds must be <= 10000 (seed ranges)")
        positive(f"{path}.confidence", self.confidence)
        if not self.confidence < 1:
            raise fail(f"{path}.confidence", f"must be in (0, 1), got {self.confidence!r}")
        positive(f"{path}.family_tolerance", self.family_tolerance, allow_zero=True)
        increasing(f"{path}.shrinkage", self.shrinkage, "strengths", allow_zero=True, kind="ridge strengths")
        if self.shrinkage and not self.families:
            raise fail(f"{path}.shrinkage", "the strength is chosen by cross-validation over families: set families")
        if self.families and len(self.trust_radius) > 1:
            raise fail(f"{path}.trust_radius", "with families, one radius at most (shrinkage replaces the choice)")


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
        choice(f"{path}.clip", self.clip, TEXT_CLIP_MODES)
        choice(f"{path}.t5", self.t5, TEXT_T5_MODES)
