"""The recipe's scheduler choice (``sampler.scheduler`` / ``sampler.timestep_spacing``) applied to a pipeline.

A swap keeps the pipeline's noise schedule (betas, prediction type, flow shift, ...) from its current
scheduler config and only changes the update rule, like ``Cls.from_config(pipe.scheduler.config)`` in the
diffusers docs. It is done before calibration and quantization, so the exported ``scheduler/`` folder holds
the swapped scheduler and a reloaded export samples with it.
"""

from __future__ import annotations

from types import MappingProxyType

from qdiff.errors import QdiffError

# recipe name -> diffusers class name
SCHEDULER_CLASSES = MappingProxyType(
    {
        "euler_a": "EulerAncestralDiscreteScheduler",  # SDXL-Turbo / SD-Turbo (trailing)
        "euler": "EulerDiscreteScheduler",
        "lcm": "LCMScheduler",  # LCM-Dreamshaper, LCM-LoRA, PixArt-LCM
        "tcd": "TCDScheduler",  # PCM / TCD
        "flow_euler": "FlowMatchEulerDiscreteScheduler",  # FLUX.1-schnell, SD3
        "ddim": "DDIMScheduler",
    }
)
_FLOW = ("FlowMatchEulerDiscreteScheduler",)


def apply_sampler_scheduler(pipe, sampler) -> bool:
    """Install ``sampler.scheduler`` (with ``sampler.timestep_spacing``) on ``pipe``; True if it changed.

    ``sampler`` is a :class:`qdiff.config.recipe.SamplerConfig`. A flow-matching scheduler is never swapped with a
    noise-prediction one (or back): the denoiser was trained for one of the two.
    """
    name, spacing = getattr(sampler, "scheduler", None), getattr(sampler, "timestep_spacing", None)
    if name is None and spacing is None:
        return False
    import diffusers

    current = pipe.scheduler
    cur_cls = type(current).__name__
    cls_name = SCHEDULER_CLASSES[name] if name is not None else cur_cls
    if (cls_name in _FLOW) != (cur_cls in _FLOW):
        raise QdiffError(
            f"recipe: sampler.scheduler: {name!r} does not fit this pipeline's {cur_cls} "
            "(flow-matching and noise-prediction schedulers are not interchangeable)"
        )
    overrides = {} if spacing is None else {"timestep_spacing": spacing}
    if cls_name == cur_cls and all(current.config.get(k) == v for k, v in overrides.items()):
        return False
    cls = getattr(diffusers, cls_name)
    pipe.scheduler = cls.from_config(dict(current.config), **overrides)
    return True
