"""QSchedScheduler: bit-identical to the wrapped scheduler at identity, the update math, drop-in behaviour."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from qdiff.errors import QdiffError
from qdiff.sched.qsched import QSchedScheduler, QSchedStepsWarning, Schedule, apply_schedule, get_schedule

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
STEPS = 2


def tiny_flux_pipeline(seed: int = 0):
    """A tiny FLUX.1-shaped pipeline (FlowMatchEulerDiscreteScheduler) with random weights, built offline."""
    from qdiff.models.tiny_families import tiny_flux_schnell_pipeline

    return tiny_flux_schnell_pipeline(seed)


def _pipe(name: str):
    from diffusers import TCDScheduler

    from qdiff.models.tiny import tiny_sd_pipeline

    if name == "flowmatch":
        return tiny_flux_pipeline(), {"max_sequence_length": 16}
    if name == "tcd":
        pipe = tiny_sd_pipeline()
        pipe.scheduler = TCDScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1,
                                      original_inference_steps=50)  # fmt: skip
        return pipe, {"eta": 0.3}  # stochastic TCD: the generator must reach step() through the wrapper
    return tiny_sd_pipeline(scheduler=name), {}


def _images(pipe, extra, seed=0):
    gen = torch.Generator("cpu").manual_seed(seed)
    out = pipe(["a red cat", "a blue house"], num_inference_steps=STEPS, generator=gen, output_type="pt",
               guidance_scale=1.0, height=32, width=32, **extra)  # fmt: skip
    return out.images


@pytest.mark.parametrize("name", ["lcm", "euler_a", "euler", "tcd", "ddim", "flowmatch"])
def test_identity_is_bit_identical_in_a_pipeline(name):
    pipe, extra = _pipe(name)
    plain = _images(pipe, extra)
    apply_schedule(pipe, Schedule.identity(STEPS))
    assert isinstance(pipe.scheduler, QSchedScheduler)
    wrapped = _images(pipe, extra)
    assert torch.equal(plain, wrapped)
    apply_schedule(pipe, Schedule((0.9, 1.05), (1.03, 0.98)))
    changed = _images(pipe, extra)
    assert (changed - plain).abs().max() > 1e-3  # the coefficients do reach the sampler
    apply_schedule(pipe, None)
    assert torch.equal(_images(pipe, extra), plain)
    assert pipe.config["scheduler"][1] == type(pipe.scheduler).__name__  # model_index keeps the real class


def test_euler_update_matches_hand_written_loop():
    """x_{i+1} = c_x x_i + (sigma_{i+1} - sigma_i) c_eps eps_i (Euler, epsilon prediction), in float64."""
    from diffusers import EulerDiscreteScheduler

    c_eps, c_x = (0.95, 1.02, 1.1), (1.01, 0.97, 1.0)
    sched = QSchedScheduler(EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing"), Schedule(c_eps, c_x))
    sched.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g) * sched.init_noise_sigma
    eps = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(3)]
    sigmas = sched.sigmas.double()
    ref = x.double()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(eps[i], t, x).prev_sample
        ref = c_x[i] * ref + (sigmas[i + 1] - sigmas[i]) * c_eps[i] * eps[i].double()
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)


def test_ddim_step_index_from_timestep():
    """DDIM has no step_index; the wrapper finds the step from the timestep."""
    from diffusers import DDIMScheduler

    sched = QSchedScheduler(
        DDIMScheduler(**SD_BETAS, timestep_spacing="trailing"), Schedule((1.0, 1.0, 1.0), (1,) * 3)
    )
    sched.set_timesteps(3)
    assert [sched._qs_index(t) for t in sched.timesteps] == [0, 1, 2]
    assert sched._qs_index(torch.tensor(5)) is None  # off the schedule: plain DDIM step


def test_step_count_mismatch_and_unsupported():
    from diffusers import LCMScheduler, PNDMScheduler

    sched = QSchedScheduler(LCMScheduler(**SD_BETAS), Schedule.identity(4), strict=True)
    with pytest.raises(QdiffError, match="fitted for 4 steps but the sampler runs 2"):
        sched.set_timesteps(2)
    with pytest.warns(QSchedStepsWarning, match="fitted for 4 steps but the sampler runs 2: running the plain"):
        QSchedScheduler(LCMScheduler(**SD_BETAS), Schedule.identity(4)).set_timesteps(2)
    with pytest.raises(QdiffError, match="does not support scheduler PNDMScheduler"):
        QSchedScheduler(PNDMScheduler(**SD_BETAS), Schedule.identity(2))


@pytest.mark.parametrize("name", ["lcm", "ddim"])
def test_pipeline_with_another_step_count_runs_the_plain_scheduler(name):
    """One warning per run, and the images of the plain scheduler at that step count (coefficients not applied)."""
    from diffusers import SchedulerMixin

    pipe, extra = _pipe(name)
    plain_cls = type(pipe.scheduler)
    gen = torch.Generator("cpu").manual_seed(0)
    kw = dict(num_inference_steps=STEPS + 1, output_type="pt", guidance_scale=1.0, height=32, width=32, **extra)
    plain = pipe(["a red cat"], generator=gen, **kw).images
    pipe.scheduler = QSchedScheduler(pipe.scheduler, Schedule((0.9, 1.05), (1.03, 0.98)))  # diffusers' setattr
    assert isinstance(pipe.scheduler, (plain_cls, SchedulerMixin, QSchedScheduler))
    assert pipe.config["scheduler"] == ("diffusers", plain_cls.__name__)  # model_index names the real class
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = pipe(["a red cat"], generator=torch.Generator("cpu").manual_seed(0), **kw).images
    assert [type(w.message) for w in caught if issubclass(w.category, QSchedStepsWarning)] == [QSchedStepsWarning]
    assert torch.equal(plain, wrapped)


def test_drop_in_delegation():
    from diffusers import EulerAncestralDiscreteScheduler

    inner = EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
    sched = QSchedScheduler(inner, Schedule.identity(4))
    sched.set_timesteps(4)
    assert torch.equal(sched.timesteps, inner.timesteps)
    assert sched.init_noise_sigma == inner.init_noise_sigma and sched.order == inner.order
    assert sched.config is inner.config
    x, n = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    assert torch.equal(sched.add_noise(x, n, sched.timesteps[:1]), inner.add_noise(x, n, inner.timesteps[:1]))
    assert torch.equal(sched.scale_model_input(x, sched.timesteps[0]), inner.scale_model_input(x, inner.timesteps[0]))
    sched.set_begin_index(0)
    assert inner.begin_index == 0
    assert "generator" in inspect.signature(sched.step).parameters
    assert QSchedScheduler(sched, Schedule.identity(4)).inner is inner  # re-wrapping does not stack


def test_schedule_validation_and_round_trip(tmp_path):
    s = Schedule((0.9, 1.0), (1.1, 1.0), {"parameterisation": "ramp"})
    s.save(tmp_path / "q.json")
    back = Schedule.load(tmp_path / "q.json")
    assert back == s and back.meta == s.meta
    with pytest.raises(QdiffError, match="same non-zero length"):
        Schedule((1.0,), (1.0, 1.0))
    with pytest.raises(QdiffError, match="finite and > 0"):
        Schedule((float("nan"),), (1.0,))
    with pytest.raises(QdiffError, match="'steps' is 3"):
        Schedule.from_dict({"steps": 3, "c_eps": [1.0], "c_x": [1.0]})


def test_get_schedule():
    from qdiff.models.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    assert get_schedule(pipe) is None
    apply_schedule(pipe, Schedule.identity(2))
    assert get_schedule(pipe) == Schedule.identity(2)
