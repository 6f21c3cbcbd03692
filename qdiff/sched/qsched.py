"""Q-Sched scheduler wrapper: per-step coefficients on the model output and the sample.

Q-Sched (arXiv 2509.01624) corrects a quantized few-step sampler's trajectory in the scheduler: inside
``step()``, before the wrapped scheduler's own update,

    model_output <- c_eps[i] * model_output,     sample <- c_x[i] * sample,     i = current step index.

The weights are untouched and there are no extra FLOPs beyond two scalar multiplies. With all
coefficients equal to 1 the wrapper is bit-identical to the wrapped scheduler (``x * 1.0 == x`` exactly
in IEEE arithmetic), which the tests check image by image for every supported scheduler.

The wrapper is a drop-in scheduler: every attribute it does not define (``set_timesteps``, ``timesteps``,
``init_noise_sigma``, ``scale_model_input``, ``order``, ``config``, ``add_noise``, ``step_index``,
``set_begin_index`` ...) is the wrapped scheduler's own, and ``step`` exposes the wrapped ``step``'s
signature so that pipelines which inspect it (``eta``, ``generator``) pass the same arguments.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdiff.errors import QdiffError

SUPPORTED = (
    "LCMScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "TCDScheduler",
    "DDIMScheduler",
    "FlowMatchEulerDiscreteScheduler",
)
SCHEDULE_FILE = "qsched.json"  # written next to scheduler_config.json in the scheduler folder


@dataclass(frozen=True)
class Schedule:
    """Per-step coefficients (``steps`` entries each) and how they were found (free-form ``meta``)."""

    c_eps: tuple[float, ...]
    c_x: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "c_eps", tuple(float(v) for v in self.c_eps))
        object.__setattr__(self, "c_x", tuple(float(v) for v in self.c_x))
        if not self.c_eps or len(self.c_eps) != len(self.c_x):
            raise QdiffError(
                f"schedule: c_eps and c_x need the same non-zero length, got {len(self.c_eps)} and {len(self.c_x)}"
            )
        for name in ("c_eps", "c_x"):
            bad = [v for v in getattr(self, name) if not (math.isfinite(v) and v > 0)]
            if bad:
                raise QdiffError(f"schedule: {name}: coefficients must be finite and > 0, got {bad[0]!r}")

    @property
    def steps(self) -> int:
        return len(self.c_eps)

    @classmethod
    def identity(cls, steps: int) -> Schedule:
        return cls((1.0,) * steps, (1.0,) * steps)

    @property
    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.c_eps + self.c_x)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "c_eps": list(self.c_eps), "c_x": list(self.c_x), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "schedule") -> Schedule:
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("c_eps"), list)
            or not isinstance(data.get("c_x"), list)
        ):
            raise QdiffError(f"{source}: expected a mapping with lists 'c_eps' and 'c_x'")
        try:
            sched = cls(tuple(data["c_eps"]), tuple(data["c_x"]), dict(data.get("meta") or {}))
        except (TypeError, ValueError) as exc:
            raise QdiffError(f"{source}: bad coefficients ({exc})") from None
        if data.get("steps", sched.steps) != sched.steps:
            raise QdiffError(f"{source}: 'steps' is {data['steps']!r} but there are {sched.steps} coefficients")
        return sched

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise QdiffError(f"{path}: cannot read schedule ({exc})") from None
        return cls.from_dict(data, source=str(path))


class QSchedScheduler:
    """Wraps a diffusers scheduler; scales ``model_output`` by ``c_eps[i]`` and ``sample`` by ``c_x[i]``."""

    _OWN = frozenset({"inner", "schedule", "_step", "_set_timesteps"})

    def __init__(self, inner: Any, schedule: Schedule) -> None:
        if isinstance(inner, QSchedScheduler):
            inner = inner.inner  # re-wrapping replaces the coefficients, it does not stack them
        name = type(inner).__name__
        if name not in SUPPORTED:
            raise QdiffError(f"Q-Sched does not support scheduler {name} (supported: {', '.join(SUPPORTED)})")
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "schedule", schedule)

        @functools.wraps(inner.step)  # __wrapped__ -> inspect.signature shows eta/generator like the original
        def step(model_output, timestep, sample, *args, **kwargs):
            i = self._index(timestep)
            if not 0 <= i < schedule.steps:
                raise QdiffError(f"Q-Sched: step index {i} outside the schedule's {schedule.steps} steps")
            return inner.step(model_output * schedule.c_eps[i], timestep, sample * schedule.c_x[i], *args, **kwargs)

        @functools.wraps(inner.set_timesteps)  # same signature: pipelines probe it for `timesteps` / `sigmas`
        def set_timesteps(*args, **kwargs):
            out = inner.set_timesteps(*args, **kwargs)
            n = len(inner.timesteps) // max(int(getattr(inner, "order", 1)), 1)
            if n != schedule.steps:
                raise QdiffError(
                    f"Q-Sched: the schedule was fitted for {schedule.steps} steps but the sampler runs {n}; "
                    f"use num_inference_steps={schedule.steps} or fit a schedule for {n} steps"
                )
            return out

        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_set_timesteps", set_timesteps)

    # ---- changed methods: step scales its inputs, set_timesteps checks the step count ----
    @property
    def step(self):
        return self._step

    def _index(self, timestep) -> int:
        """The step about to run: the wrapped scheduler's ``step_index``, else where ``timestep`` sits."""
        idx = getattr(self.inner, "step_index", None)
        if idx is not None:
            return int(idx)
        begin = getattr(self.inner, "begin_index", None)
        if begin is not None:
            return int(begin)
        hits = (self.inner.timesteps == timestep).nonzero()
        if len(hits) == 0:
            raise QdiffError(f"Q-Sched: timestep {timestep!r} is not in the scheduler's timesteps")
        # Euler-type schedulers start at the second match when a timestep repeats (diffusers' convention).
        return int(hits[1 if len(hits) > 1 and hasattr(self.inner, "step_index") else 0])

    @property
    def set_timesteps(self):
        return self._set_timesteps

    # ---- delegation -----------------------------------------------------------------------------
    def __getattr__(self, name: str):
        if name in QSchedScheduler._OWN:  # not set yet (e.g. during copy/unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in QSchedScheduler._OWN:
            raise AttributeError(f"QSchedScheduler.{name} is read-only; build a new wrapper instead")
        setattr(self.inner, name, value)

    def __len__(self) -> int:
        return len(self.inner)

    def __repr__(self) -> str:
        return f"QSchedScheduler({type(self.inner).__name__}, c_eps={self.schedule.c_eps}, c_x={self.schedule.c_x})"

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The wrapped scheduler's config (diffusers layout) plus ``qsched.json`` in the same folder."""
        self.inner.save_pretrained(save_directory, **kwargs)
        self.schedule.save(Path(save_directory) / SCHEDULE_FILE)


def apply_schedule(pipe, schedule: Schedule | None):
    """Install ``schedule`` on ``pipe.scheduler`` (``None`` removes the wrapper); returns ``pipe``.

    The pipeline's config (``model_index.json``) keeps naming the wrapped scheduler class, because the
    scheduler folder holds that scheduler's own config; the coefficients travel in ``qsched.json``.
    """
    current = pipe.scheduler
    inner = current.inner if isinstance(current, QSchedScheduler) else current
    new = inner if schedule is None else QSchedScheduler(inner, schedule)
    object.__setattr__(pipe, "scheduler", new)  # bypass DiffusionPipeline.__setattr__'s config rewrite
    return pipe


def get_schedule(pipe) -> Schedule | None:
    """The schedule installed on ``pipe.scheduler``, or ``None``."""
    sched = getattr(pipe, "scheduler", None)
    return sched.schedule if isinstance(sched, QSchedScheduler) else None
