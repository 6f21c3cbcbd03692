"""Parameterisations theta -> (c_eps, c_x) against numpy.linspace and by hand."""

from __future__ import annotations

import numpy as np
import pytest

from qdiff.errors import QdiffError
from qdiff.sched import params


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_ramp_is_linspace_to_one(steps):
    c_eps, c_x = params.coefficients("ramp", (0.9, 1.15), steps)
    np.testing.assert_allclose(c_eps, np.linspace(0.9, 1.0, steps), rtol=0, atol=1e-15)
    np.testing.assert_allclose(c_x, np.linspace(1.15, 1.0, steps), rtol=0, atol=1e-15)
    if steps > 1:
        assert c_eps[-1] == 1.0 and c_x[-1] == 1.0


def test_ramp4_and_per_step():
    c_eps, c_x = params.coefficients("ramp4", (0.955, 1.099, 1.012, 0.967), 4)  # the reference's SDXL-Turbo example
    np.testing.assert_allclose(c_eps, np.linspace(0.955, 1.099, 4), atol=1e-15)
    np.testing.assert_allclose(c_x, np.linspace(1.012, 0.967, 4), atol=1e-15)
    theta = (0.9, 0.95, 1.0, 1.05, 1.1, 1.15)
    assert params.coefficients("per_step", theta, 3) == ((0.9, 0.95, 1.0), (1.05, 1.1, 1.15))


@pytest.mark.parametrize("name,steps,dim", [("ramp", 4, 2), ("ramp4", 4, 4), ("per_step", 4, 8), ("per_step", 1, 2)])
def test_identity_theta_gives_identity(name, steps, dim):
    theta = params.identity_theta(name, steps)
    assert len(theta) == dim == params.dim(name, steps)
    assert params.to_schedule(name, theta, steps).is_identity


def test_errors():
    with pytest.raises(QdiffError, match="takes 2 values, got 3"):
        params.coefficients("ramp", (1.0, 1.0, 1.0), 4)
    with pytest.raises(QdiffError, match="unknown parameterisation 'cubic'"):
        params.dim("cubic", 4)
