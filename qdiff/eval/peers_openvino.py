"""The CPU engine peers of ``qdiff eval --peers``: ``openvino-fp32`` and ``openvino-nncf-int8``.

Both start from the float reference pipeline and write it as an OpenVINO folder with qdiff's own exporter
(:func:`qdiff.engines.openvino.export.write_openvino`: the same component layout, names and f32 float parts as a
qdiff export run on OpenVINO), into a temporary folder that lives as long as the pipeline.

* ``openvino-fp32`` — the float model on OpenVINO, float parts in f32 (what qdiff's OpenVINO exports are compared
  with for speed).
* ``openvino-nncf-int8`` — NNCF's own post-training int8 of the float UNet (``nncf.quantize``,
  ``model_type=TRANSFORMER``: int8 weights and static int8 activations where NNCF places its FakeQuantize nodes),
  calibrated on the UNet inputs the float pipeline produces on the recipe's calibration prompts and seeds (every
  step of every prompt), the way NNCF's diffusion examples calibrate. Text encoder and VAE stay f32.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError

OPENVINO_HINT = "not installed: pip install 'qdiff[openvino]'"


@dataclass(frozen=True)
class EnginePeer:
    """A peer that runs the reference on another engine (same ``build`` contract as :class:`qdiff.eval.peers.Peer`)."""

    name: str
    module: str  # the library it needs beside openvino ("openvino" itself, or "nncf")
    summary: str

    @property
    def nncf(self) -> bool:
        return self.module == "nncf"

    def available(self) -> bool:
        from qdiff.eval.peers import _has_module  # (peers imports this module)

        return all(_has_module(m) for m in {"openvino", self.module})

    def build(self, pipe_factory: Callable[[], object], recipe: Recipe, layers: list[str]) -> tuple[object, str]:
        """``(OpenVINO pipeline, note)`` from a fresh float reference; ``layers`` is unused (NNCF picks its own)."""
        from qdiff.engines.openvino.export import write_openvino
        from qdiff.engines.openvino.runtime import load_openvino

        if not self.available():
            raise QdiffError(OPENVINO_HINT)
        from qdiff.export.resolve import place

        pipe = pipe_factory()
        place(pipe, "cpu", "float32")  # traced and calibrated in float32 whatever --dtype the eval uses
        transform, detail = None, "float parts f32"
        if self.nncf:
            data = unet_calibration_inputs(pipe, recipe)
            transform = _nncf_quantize(data)
            detail = f"NNCF int8 calibrated on {len(data)} UNet calls ({recipe.calibration.prompts}); {detail}"
        holder = tempfile.TemporaryDirectory(prefix=f"qdiff-{self.name}-")
        write_openvino(pipe, Path(holder.name), precision="f32", progress=False, transform_unet=transform)
        del pipe
        ov_pipe = load_openvino(holder.name)
        ov_pipe._qdiff_folder = holder  # removed with the pipeline
        return ov_pipe, f"{self.name}: {self.summary}; {detail}"


def unet_calibration_inputs(pipe, recipe: Recipe) -> list[dict]:
    """The UNet's inputs (numpy, by OpenVINO input name) at every call while ``pipe`` samples the recipe's calibration
    prompts with their seeds."""
    import torch

    from qdiff.sampling.draw import draw
    from qdiff.sampling.prompts import load_prompts

    calls: list[dict] = []

    def record(_module, args, kwargs) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        batch = sample.shape[0]
        item = {"sample": sample, "timestep": torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch),
                "encoder_hidden_states": hidden}  # fmt: skip
        if kwargs.get("timestep_cond") is not None:
            item["timestep_cond"] = kwargs["timestep_cond"]
        item.update(kwargs.get("added_cond_kwargs") or {})
        calls.append({k: v.detach().float().numpy().copy() for k, v in item.items()})

    cal = recipe.calibration
    prompts = load_prompts(cal.prompts, cal.num_prompts)
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            draw(pipe, prompts, None, recipe.sampler, cal.batch_size, keep=False)
    finally:
        handle.remove()
    return calls


def _nncf_quantize(data: list[dict]):
    def transform(model):
        import nncf

        names = [p.get_any_name() for p in model.inputs]
        items = [{n: call[n] for n in names} for call in data]
        return nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))

    return transform


OPENVINO_PEERS = (
    EnginePeer("openvino-fp32", "openvino", "the float model on OpenVINO (CPU plugin)"),
    EnginePeer("openvino-nncf-int8", "nncf", "NNCF post-training int8 (quantize, TRANSFORMER) on OpenVINO"),
)
