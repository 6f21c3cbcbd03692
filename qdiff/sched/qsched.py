"""Q-Sched scheduler wrapper: per-step coefficients on the model output and the sample.

Q-Sched (arXiv 2509.01624) corrects a quantized few-step sampler's trajectory in the scheduler: inside
``step()``, before the wrapped scheduler's own update,

    model_output <- c_eps[i] * model_output,     sample <- c_x[i] * sample,     i = current step index.

The weights are untouched and there are no extra FLOPs beyond two scalar multiplies. With all
coefficients equal to 1 the wrapper is bit-identical to the wrapped scheduler (``x * 1.0 == x`` exactly
in IEEE arithmetic), which the tests check image by image for every supported scheduler.

The wrapper is a drop-in scheduler: ``QSchedScheduler(inner, schedule)`` is an instance of a subclass of
the wrapped class (``isinstance`` checks in pipelines hold) sharing the wrapped scheduler's state, and every
attribute but ``step`` and ``set_timesteps`` is the wrapped scheduler's own. ``step`` and ``set_timesteps``
expose the wrapped signatures so that pipelines which inspect them (``eta``, ``generator``, ``sigmas``) pass
the same arguments. Coefficients apply on the schedule only: a sampler running another step count, or a
DDIM step at a timestep not in ``timesteps``, is the plain scheduler (rules in docs/qsched.md).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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


class QSchedStepsWarning(UserWarning):
    """The sampler runs another step count than the schedule's: the plain scheduler runs instead."""


class QSchedScheduler:
    """Wraps a diffusers scheduler; scales ``model_output`` by ``c_eps[i]`` and ``sample`` by ``c_x[i]``.

    ``QSchedScheduler(inner, schedule)`` returns an instance of a subclass of ``type(inner)`` built once per
    wrapped class (:func:`_wrapper_class`), so ``isinstance(wrapped, SchedulerMixin)`` and
    ``isinstance(wrapped, type(inner))`` hold. The wrapper shares ``inner.__dict__``: timesteps, step index,
    config and any attribute set on either object are the same state. Only ``step`` and ``set_timesteps``
    differ, and both call the wrapped scheduler's own methods on ``inner``.
    """

    __slots__ = ("_qs_inner", "_qs_schedule", "_qs_strict")

    def __new__(cls, inner: Any, schedule: Schedule, strict: bool = False):
        if isinstance(inner, QSchedScheduler):
            inner = inner.inner  # re-wrapping replaces the coefficients, it does not stack them
        name = type(inner).__name__
        if name not in SUPPORTED:
            raise QdiffError(f"Q-Sched does not support scheduler {name} (supported: {', '.join(SUPPORTED)})")
        if not isinstance(schedule, Schedule):
            raise QdiffError(f"Q-Sched: schedule must be a Schedule, got {type(schedule).__name__}")
        obj = object.__new__(_wrapper_class(type(inner)))
        object.__setattr__(obj, "__dict__", inner.__dict__)  # one state for both objects
        object.__setattr__(obj, "_qs_inner", inner)
        object.__setattr__(obj, "_qs_schedule", schedule)
        object.__setattr__(obj, "_qs_strict", bool(strict))
        return obj

    def __init__(self, inner: Any, schedule: Schedule, strict: bool = False) -> None:
        """Everything is set in ``__new__``; this keeps the wrapped class's ``__init__`` from running again."""

    # ---- own, read-only state -------------------------------------------------------------------
    @property
    def inner(self) -> Any:
        """The plain scheduler (same ``__dict__`` as the wrapper)."""
        return self._qs_inner

    @inner.setter
    def inner(self, value: Any) -> None:
        raise AttributeError("QSchedScheduler.inner is read-only; build a new wrapper instead")

    @property
    def schedule(self) -> Schedule:
        return self._qs_schedule

    @schedule.setter
    def schedule(self, value: Any) -> None:
        raise AttributeError("QSchedScheduler.schedule is read-only; build a new wrapper instead")

    @property
    def strict(self) -> bool:
        """True: a step count other than the schedule's is an error; False: plain scheduler + one warning."""
        return self._qs_strict

    # ---- the two changed methods (exposed per class with the wrapped signatures) ------------------
    def _qs_step(self, model_output, timestep, sample, args: tuple, kwargs: dict):
        i = self._qs_index(timestep)
        if i is not None:
            model_output = model_output * self._qs_schedule.c_eps[i]
            sample = sample * self._qs_schedule.c_x[i]
        return self._qs_inner.step(model_output, timestep, sample, *args, **kwargs)

    def _qs_set_timesteps(self, args: tuple, kwargs: dict):
        """The wrapped ``set_timesteps``; on any error the scheduler's state is restored before re-raising."""
        state = self._qs_inner.__dict__
        before = dict(state)
        try:
            out = self._qs_inner.set_timesteps(*args, **kwargs)
            n, steps = self._qs_running_steps(), self._qs_schedule.steps
            if n != steps:
                msg = f"Q-Sched: the schedule was fitted for {steps} steps but the sampler runs {n}"
                if self._qs_strict:
                    raise QdiffError(f"{msg}; use num_inference_steps={steps} or fit a schedule for {n} steps")
                warnings.warn(f"{msg}: running the plain scheduler (no coefficients) for these {n} steps",
                              QSchedStepsWarning, stacklevel=3)  # fmt: skip
        except BaseException:
            state.clear()
            state.update(before)
            raise
        return out

    def _qs_running_steps(self) -> int | None:
        timesteps = getattr(self._qs_inner, "timesteps", None)
        if timesteps is None:
            return None
        return len(timesteps) // max(int(getattr(self._qs_inner, "order", 1) or 1), 1)

    def _qs_index(self, timestep) -> int | None:
        """The schedule position of the step about to run, or ``None`` off the schedule (plain step).

        Off the schedule: the sampler runs another step count than the schedule's, or (DDIM) ``timestep`` is
        not in ``timesteps``, or (Euler-type) the scheduler cannot place it (its own ``step`` then raises).
        """
        inner, steps = self._qs_inner, self._qs_schedule.steps
        if self._qs_running_steps() != steps:
            return None
        timesteps = inner.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(timesteps.device)
        if hasattr(type(inner), "index_for_timestep"):  # Euler-type: the scheduler tracks its step index
            idx = inner.step_index
            if idx is None:
                idx = inner.begin_index
            if idx is None:
                try:
                    idx = inner.index_for_timestep(timestep)  # what the wrapped step() will use
                except (IndexError, RuntimeError):
                    return None
        else:  # DDIM: the position of the timestep in the list
            hits = (timesteps == timestep).nonzero()
            if len(hits) == 0:
                return None
            idx = hits[0]
        idx = int(idx)
        return idx if 0 <= idx < steps else None

    # ---- construction from configs: the schedule is not part of the diffusers config ----------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """The plain wrapped class built from ``config`` (a config carries no coefficients)."""
        return cls._qs_wrapped_class.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: str | None = None, **kwargs):
        """The wrapped class's ``from_pretrained``, re-wrapped when the folder holds ``qsched.json``."""
        out = cls._qs_wrapped_class.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = Path(str(pretrained_model_name_or_path or "")) / (subfolder or "")
        if not (folder / SCHEDULE_FILE).is_file():
            return out
        schedule = Schedule.load(folder / SCHEDULE_FILE)
        if isinstance(out, tuple):
            return (QSchedScheduler(out[0], schedule), *out[1:])
        return QSchedScheduler(out, schedule)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The wrapped scheduler's config (diffusers layout) plus ``qsched.json`` in the same folder."""
        self._qs_inner.save_pretrained(save_directory, **kwargs)
        self._qs_schedule.save(Path(save_directory) / SCHEDULE_FILE)

    # ---- copies, pickling, messages -----------------------------------------------------------------
    def __reduce__(self):
        return QSchedScheduler, (self._qs_inner, self._qs_schedule, self._qs_strict)

    def __copy__(self):
        return QSchedScheduler(copy.copy(self._qs_inner), self._qs_schedule, self._qs_strict)

    def __deepcopy__(self, memo: dict):
        return QSchedScheduler(copy.deepcopy(self._qs_inner, memo), self._qs_schedule, self._qs_strict)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # ConfigMixin: config keys, with diffusers' deprecation notice
        except AttributeError:
            label = f"QSchedScheduler({type(self).__name__})"
            raise AttributeError(f"'{label}' object has no attribute '{name}'", name=name, obj=self) from None

    def __repr__(self) -> str:
        return f"QSchedScheduler({type(self).__name__}, c_eps={self._qs_schedule.c_eps}, c_x={self._qs_schedule.c_x})"


@functools.cache  # per-process cache: one wrapper class per wrapped class (``type(a) is type(b)``)
def _wrapper_class(inner_cls: type) -> type:
    """``class <Inner>(QSchedScheduler, Inner)`` with ``step``/``set_timesteps`` carrying Inner's signatures.

    The class keeps the wrapped class's ``__name__`` and ``__module__``: diffusers records a pipeline component
    as ``(library, class name)`` (``model_index.json``) and a scheduler as ``_class_name`` in its config, and
    both must name the wrapped class, whose config the scheduler folder holds. ``__qualname__`` names the wrapper.
    """

    @functools.wraps(inner_cls.step)  # __wrapped__ -> inspect.signature shows eta/generator like the original
    def step(self, model_output, timestep, sample, *args, **kwargs):
        return self._qs_step(model_output, timestep, sample, args, kwargs)

    @functools.wraps(inner_cls.set_timesteps)  # pipelines probe it for `timesteps` / `sigmas`
    def set_timesteps(self, *args, **kwargs):
        return self._qs_set_timesteps(args, kwargs)

    namespace = {
        "__slots__": (),
        "__module__": inner_cls.__module__,
        "__qualname__": f"QSchedScheduler[{inner_cls.__qualname__}]",
        "__doc__": QSchedScheduler.__doc__,
        "_qs_wrapped_class": inner_cls,
        "step": step,
        "set_timesteps": set_timesteps,
    }
    return type(inner_cls.__name__, (QSchedScheduler, inner_cls), namespace)


def apply_schedule(pipe, schedule: Schedule | None, strict: bool = False):
    """Install ``schedule`` on ``pipe.scheduler`` (``None`` removes the wrapper); returns ``pipe``.

    ``strict``: a run at another step count than the schedule's raises instead of warning and running plain (the
    fit uses it, so a candidate is never silently measured as the plain scheduler).

    The pipeline's config (``model_index.json``) keeps naming the wrapped scheduler class, because the
    scheduler folder holds that scheduler's own config; the coefficients travel in ``qsched.json``.
    """
    current = pipe.scheduler
    inner = current.inner if isinstance(current, QSchedScheduler) else current
    new = inner if schedule is None else QSchedScheduler(inner, schedule, strict=strict)
    object.__setattr__(pipe, "scheduler", new)  # bypass DiffusionPipeline.__setattr__'s config rewrite
    return pipe


def get_schedule(pipe) -> Schedule | None:
    """The schedule installed on ``pipe.scheduler``, or ``None``."""
    sched = getattr(pipe, "scheduler", None)
    return sched.schedule if isinstance(sched, QSchedScheduler) else None
