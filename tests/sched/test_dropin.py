"""QSchedScheduler as a drop-in diffusers scheduler: the checks of diffusers' common scheduler suite, per wrapper.

Modelled on diffusers' ``SchedulerCommonTest`` (tests/schedulers/test_schedulers.py): public API, step and
``scale_model_input`` shapes, ``add_noise``, tuple vs dict outputs, ``save_config``/``from_config`` and
``save_pretrained``/``from_pretrained`` round trips, ``getattr`` behaviour; plus what a wrapper must add: the
``isinstance`` checks pipelines use, a whole loop bit-identical to the plain scheduler at identity
coefficients (and exactly the scaled plain step otherwise), plain steps off the schedule, and state left
unchanged by a rejected ``set_timesteps``.
"""

from __future__ import annotations

import copy
import inspect
import json
import pickle
import warnings

import numpy as np
import pytest
import torch

from qdiff.errors import QdiffError
from qdiff.sched.qsched import SCHEDULE_FILE, QSchedScheduler, QSchedStepsWarning, Schedule

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
STEPS = 4
NAMES = ["lcm", "euler_a", "euler", "tcd", "ddim", "flowmatch"]
COEFFS = Schedule((0.9, 1.05, 0.97, 1.1), (1.03, 0.98, 1.01, 0.95))


def plain(name: str):
    """A fresh plain scheduler of the kind ``name`` (configs as the tiny pipelines use them)."""
    import diffusers

    if name == "lcm":
        return diffusers.LCMScheduler(**SD_BETAS)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
    if name == "tcd":
        return diffusers.TCDScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1,
                                      original_inference_steps=50)  # fmt: skip
    if name == "ddim":
        return diffusers.DDIMScheduler(**SD_BETAS, timestep_spacing="trailing", clip_sample=False)
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


def step_kwargs(sched, seed: int = 0) -> dict:
    """``eta`` (stochastic DDIM/TCD) and a seeded generator where ``step`` takes them, as pipelines pass them."""
    params = inspect.signature(sched.step).parameters
    kw = {"eta": 0.3} if "eta" in params else {}
    if "generator" in params:
        kw["generator"] = torch.Generator().manual_seed(seed)
    return kw


def sample() -> torch.Tensor:
    return torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(1))  # (B, C, H, W)


def model(x: torch.Tensor, t) -> torch.Tensor:
    """diffusers' dummy model: ``x * t / (t + 1)``."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return x * t / (t + 1)


def scale(sched, x: torch.Tensor, t) -> torch.Tensor:
    """``scale_model_input`` where the scheduler has one (flow matching has none: pipelines skip it)."""
    return sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x


def state(sched) -> dict:
    """A deep snapshot of the scheduler's instance state."""
    return copy.deepcopy(dict(vars(sched)))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), key
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), key
        else:
            assert x == y, key


@pytest.mark.parametrize("name", NAMES)
def test_isinstance_and_shared_state(name):
    from diffusers import ConfigMixin, SchedulerMixin

    inner = plain(name)
    w = QSchedScheduler(inner, COEFFS)
    assert isinstance(w, SchedulerMixin) and isinstance(w, ConfigMixin) and isinstance(w, type(inner))
    assert isinstance(w, QSchedScheduler) and not isinstance(inner, QSchedScheduler)
    assert type(w).__name__ == type(inner).__name__ and type(w).__module__ == type(inner).__module__
    assert type(QSchedScheduler(plain(name), COEFFS)) is type(w)  # one wrapper class per wrapped class
    assert w.inner is inner and vars(w) is vars(inner) and w.config is inner.config
    w.dummy_attribute = 5
    assert inner.dummy_attribute == 5
    assert w.compatibles == inner.compatibles
    with pytest.raises(AttributeError, match="read-only"):
        w.schedule = Schedule.identity(STEPS)


@pytest.mark.parametrize("name", NAMES)
def test_public_api_shapes_and_outputs(name):
    w = QSchedScheduler(plain(name), Schedule.identity(STEPS))
    public = ("step", "set_timesteps", "timesteps", "config", "save_pretrained", "from_pretrained", "from_config")
    sd_only = ("init_noise_sigma", "scale_model_input", "add_noise")  # flow matching: scale_noise instead
    for attr in public + (("scale_noise",) if name == "flowmatch" else sd_only):
        assert hasattr(w, attr) and hasattr(w.inner, attr), attr
    w.set_timesteps(STEPS)
    x = sample()
    assert scale(w, x, w.timesteps[0]).shape == x.shape
    out0 = w.step(0.1 * x, w.timesteps[0], x, **step_kwargs(w)).prev_sample
    out1 = w.step(0.1 * x, w.timesteps[1], x, **step_kwargs(w)).prev_sample
    assert out0.shape == x.shape == out1.shape

    w.set_timesteps(STEPS)  # tuple output equals the dict output
    as_dict = w.step(0.1 * x, w.timesteps[0], x, **step_kwargs(w))
    w.set_timesteps(STEPS)
    as_tuple = w.step(0.1 * x, w.timesteps[0], x, return_dict=False, **step_kwargs(w))
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.prev_sample)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_and_scale_model_input_match_plain(name):
    ref, w = plain(name), QSchedScheduler(plain(name), COEFFS)
    ref.set_timesteps(STEPS)
    w.set_timesteps(STEPS)
    x, noise = sample(), torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    t = w.timesteps[1][None]
    if name == "flowmatch":  # flow matching noises with scale_noise
        assert torch.equal(w.scale_noise(x, t, noise), ref.scale_noise(x, t, noise))
    else:
        assert torch.equal(w.add_noise(x, noise, t), ref.add_noise(x, noise, t))
    assert torch.equal(scale(w, x, w.timesteps[0]), scale(ref, x, ref.timesteps[0]))


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips(name, tmp_path):
    inner = plain(name)
    inner_cls = type(inner)
    w = QSchedScheduler(inner, COEFFS)
    w.save_config(tmp_path / "cfg")
    saved = json.loads(next((tmp_path / "cfg").glob("*.json")).read_text())
    assert saved["_class_name"] == inner_cls.__name__  # loadable by diffusers as the plain class
    back = inner_cls.from_pretrained(tmp_path / "cfg")
    expected = {k: v for k, v in w.config.items() if k != "_use_default_values"}
    assert type(back) is inner_cls and dict(back.config) == expected
    fresh = type(w).from_config(w.config)  # a config carries no coefficients: the plain class
    assert type(fresh) is inner_cls and dict(fresh.config) == dict(w.config)

    w.save_pretrained(tmp_path / "sched")
    assert Schedule.load(tmp_path / "sched" / SCHEDULE_FILE) == COEFFS
    again = type(w).from_pretrained(tmp_path / "sched")  # the sidecar makes it a wrapper again
    assert isinstance(again, QSchedScheduler) and again.schedule == COEFFS
    assert dict(again.config) == dict(back.config)
    assert type(inner_cls.from_pretrained(tmp_path / "sched")) is inner_cls  # diffusers ignores the sidecar


@pytest.mark.parametrize("name", NAMES)
def test_whole_loop_identity_bit_identical_and_scaled_exactly(name):
    """Identity: every step equals the plain scheduler's; otherwise plain.step(c_eps * eps, t, c_x * x) exactly."""
    ref, ident, scaled = plain(name), QSchedScheduler(plain(name), Schedule.identity(STEPS)), plain(name)
    w = QSchedScheduler(plain(name), COEFFS)
    for s in (ref, ident, scaled, w):
        s.set_timesteps(STEPS)
    x = sample() * getattr(ref, "init_noise_sigma", 1.0)
    xr = xi = xs = xw = x
    for i, t in enumerate(ref.timesteps):
        xr = ref.step(model(scale(ref, xr, t), t), t, xr, **step_kwargs(ref, i)).prev_sample
        xi = ident.step(model(scale(ident, xi, t), t), t, xi, **step_kwargs(ident, i)).prev_sample
        assert torch.equal(xr, xi), i
        eps = model(scale(scaled, xs, t), t) * COEFFS.c_eps[i]
        xs = scaled.step(eps, t, xs * COEFFS.c_x[i], **step_kwargs(scaled, i)).prev_sample
        xw = w.step(model(scale(w, xw, t), t), t, xw, **step_kwargs(w, i)).prev_sample
        assert torch.equal(xs, xw), i
    assert not torch.equal(xr, xw)  # the coefficients reach the sampler


@pytest.mark.parametrize("name", NAMES)
def test_step_off_the_schedule_is_the_plain_step(name):
    """A timestep not in ``timesteps``: DDIM steps there as plain DDIM does; the others fail as they do."""
    ref, w = plain(name), QSchedScheduler(plain(name), COEFFS)
    ref.set_timesteps(STEPS)
    w.set_timesteps(STEPS)
    x, t = sample(), ref.timesteps[1] - 7
    assert t not in ref.timesteps
    try:
        expected = ref.step(0.1 * x, t, x, **step_kwargs(ref)).prev_sample
    except Exception as exc:  # Euler-type schedulers cannot place an unknown timestep
        with pytest.raises(type(exc)):
            w.step(0.1 * x, t, x, **step_kwargs(w))
        assert name != "ddim"
        return
    assert torch.equal(w.step(0.1 * x, t, x, **step_kwargs(w)).prev_sample, expected)


def test_ddim_steps_at_arbitrary_timesteps():
    """Custom loops and inversion step DDIM anywhere: off the schedule it is bit-identical to plain DDIM."""
    ref, w = plain("ddim"), QSchedScheduler(plain("ddim"), COEFFS)
    ref.set_timesteps(STEPS)
    w.set_timesteps(STEPS)
    x = sample()
    for t in (998, 500, 301, 1, 0, torch.tensor(123)):  # timesteps: 999, 749, 499, 249
        assert t not in w.timesteps
        assert torch.equal(w.step(0.1 * x, t, x, eta=0.0).prev_sample, ref.step(0.1 * x, t, x, eta=0.0).prev_sample)


@pytest.mark.parametrize("name", NAMES)
def test_other_step_count_runs_plain_with_one_warning(name):
    ref, w = plain(name), QSchedScheduler(plain(name), COEFFS)
    ref.set_timesteps(STEPS + 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.set_timesteps(STEPS + 2)
    assert [str(c.message) for c in caught if c.category is QSchedStepsWarning] == [
        f"Q-Sched: the schedule was fitted for {STEPS} steps but the sampler runs {STEPS + 2}: "
        f"running the plain scheduler (no coefficients) for these {STEPS + 2} steps"
    ]
    xr = xw = sample() * getattr(ref, "init_noise_sigma", 1.0)
    for i, t in enumerate(ref.timesteps):
        xr = ref.step(model(xr, t), t, xr, **step_kwargs(ref, i)).prev_sample
        xw = w.step(model(xw, t), t, xw, **step_kwargs(w, i)).prev_sample
        assert torch.equal(xr, xw), i


@pytest.mark.parametrize("name", NAMES)
def test_rejected_set_timesteps_leaves_the_state_unchanged(name):
    w = QSchedScheduler(plain(name), COEFFS, strict=True)
    w.set_timesteps(STEPS)
    x = sample()
    w.step(0.1 * x, w.timesteps[0], x, **step_kwargs(w))  # mid-run state: step index, timesteps, sigmas
    before = state(w)
    with pytest.raises(QdiffError, match=f"fitted for {STEPS} steps but the sampler runs {STEPS + 1}"):
        w.set_timesteps(STEPS + 1)  # strict: another step count is an error
    assert_same_state(before, state(w))
    with pytest.raises((TypeError, ValueError)):
        w.set_timesteps(None)  # rejected by the wrapped scheduler itself
    assert_same_state(before, state(w))
    assert_same_state(before, state(w.inner))


@pytest.mark.parametrize("name", NAMES)
def test_getattr_is_correct(name):
    w = QSchedScheduler(plain(name), COEFFS)
    w.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert w.save_pretrained == w.save_pretrained and hasattr(w, "set_timesteps")  # no warning
    with pytest.warns(FutureWarning):
        assert w.test_attribute == 5  # diffusers' deprecated direct config access still works
    with pytest.raises(AttributeError) as err:
        _ = w.does_not_exist
    assert str(err.value) == f"'QSchedScheduler({type(w.inner).__name__})' object has no attribute 'does_not_exist'"


@pytest.mark.parametrize("name", NAMES)
def test_copies_and_pickle(name):
    w = QSchedScheduler(plain(name), COEFFS)
    w.set_timesteps(STEPS)
    before = state(w)
    for other in (copy.deepcopy(w), pickle.loads(pickle.dumps(w)), copy.copy(w)):
        assert type(other) is type(w) and other.schedule == COEFFS and other.inner is not w.inner
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QSchedStepsWarning)
            other.set_timesteps(STEPS + 2)
        assert_same_state(before, state(w))  # the copy has its own state
