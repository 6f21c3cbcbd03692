"""Parameterisations: a flat search vector theta -> per-step coefficients (c_eps[steps], c_x[steps]).

* ``ramp``     — Q-Sched's reference search: each coefficient is a linear ramp from a searched start
  value to a fixed end value of 1 (``numpy.linspace(start, 1, steps)``); theta = (eps_start, x_start).
* ``ramp4``    — both ends searched: theta = (eps_start, eps_end, x_start, x_end).
* ``per_step`` — one free value per step and coefficient: theta = (c_eps[0..n-1], c_x[0..n-1]).

Every form maps theta = all ones to the identity schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

from qdiff.errors import QdiffError
from qdiff.sched.qsched import Schedule

PARAMETERISATIONS = ("ramp", "ramp4", "per_step")


def _ramp(start: float, end: float, steps: int) -> tuple[float, ...]:
    """``linspace(start, end, steps)`` in float64; one step gives ``(start,)``."""
    if steps == 1:
        return (float(start),)
    return tuple(float(start) + (float(end) - float(start)) * i / (steps - 1) for i in range(steps))


def dim(name: str, steps: int) -> int:
    """Length of theta for ``name`` at ``steps`` sampling steps."""
    _check(name, steps)
    return {"ramp": 2, "ramp4": 4, "per_step": 2 * steps}[name]


def identity_theta(name: str, steps: int) -> tuple[float, ...]:
    return (1.0,) * dim(name, steps)


def coefficients(name: str, theta: Sequence[float], steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """theta -> (c_eps, c_x), each of length ``steps``."""
    d = dim(name, steps)
    theta = tuple(float(v) for v in theta)
    if len(theta) != d:
        raise QdiffError(f"parameterisation {name!r} at {steps} steps takes {d} values, got {len(theta)}")
    if name == "ramp":
        return _ramp(theta[0], 1.0, steps), _ramp(theta[1], 1.0, steps)
    if name == "ramp4":
        return _ramp(theta[0], theta[1], steps), _ramp(theta[2], theta[3], steps)
    return theta[:steps], theta[steps:]


def to_schedule(name: str, theta: Sequence[float], steps: int, **meta) -> Schedule:
    c_eps, c_x = coefficients(name, theta, steps)
    return Schedule(c_eps, c_x, {"parameterisation": name, "theta": [float(v) for v in theta], **meta})


def _check(name: str, steps: int) -> None:
    if name not in PARAMETERISATIONS:
        raise QdiffError(f"unknown parameterisation {name!r}; choose one of: {', '.join(PARAMETERISATIONS)}")
    if steps < 1:
        raise QdiffError(f"parameterisation needs at least 1 step, got {steps}")
