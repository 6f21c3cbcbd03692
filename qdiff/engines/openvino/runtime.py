"""Run an OpenVINO folder written by :func:`qdiff.engines.openvino.export.export_openvino`, without optimum-intel.

:func:`load_openvino` verifies the folder (manifest, sha256 of every file, no link or path leaving it; OpenVINO IR is
XML + raw tensor data, nothing that executes), compiles each component on the CPU with its recorded precision, and
builds the pipeline's own diffusers class around torch-facing stand-ins (:class:`OVUNet`, :class:`OVTextEncoder`,
:class:`OVVae`), so the sampler, guidance, schedulers and a Q-Sched schedule (``scheduler/qsched.json``) are
diffusers' and qdiff's own code, unchanged. Tensors cross as float32 numpy arrays.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdiff.engines.openvino.export import FORMAT, FORMAT_VERSION, OV_MANIFEST, XML
from qdiff.engines.openvino.precision import PRECISIONS
from qdiff.errors import QdiffError


class OVModel:
    """One compiled component: ``run(name=array, ...)`` -> ``{output name: float32 tensor}``."""

    def __init__(self, core, path: Path, config: dict[str, Any]) -> None:
        from qdiff.engines.openvino.convert import widen_for_int8_kernels

        self.disk_bytes = path.with_suffix(".bin").stat().st_size  # the IR's weights file, measured on disk
        model = core.read_model(path)
        widen_for_int8_kernels(model)  # i4 codes behind a FakeQuantize: int8 in memory
        # the weights handed to the plugin (after widening), summed over the model's constants
        self.weight_bytes = sum(
            op.get_byte_size() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
        )
        # names from the model as written (a compiled model may list a tensor's other names first); fed by position
        self.inputs = [p.get_any_name() for p in model.inputs]
        self.outputs = [p.get_any_name() for p in model.outputs]
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, **named: Tensor) -> dict[str, Tensor]:
        missing = [n for n in self.inputs if n not in named]
        if missing:
            raise ValueError(f"OpenVINO model input {missing[0]!r} not given")
        result = self.request.infer({i: named[n].detach().cpu().numpy() for i, n in enumerate(self.inputs)})
        return {name: torch.from_numpy(result[port].copy()) for name, port in zip(self.outputs, self.compiled.outputs)}


class _Part(nn.Module):
    """What diffusers pipelines read from a component besides calling it: ``config``, ``dtype``, ``device``."""

    engine = "openvino"

    def __init__(self, model: OVModel, config) -> None:
        super().__init__()
        self.ov, self.config = model, config

    def _models(self) -> list[OVModel]:
        """This component's compiled models: its own, plus the VAE's encoder where there is one."""
        encoder = getattr(self, "encoder_ov", None)
        return [self.ov] if encoder is None else [self.ov, encoder]

    def weight_nbytes(self) -> int:
        """Bytes of the weights this component hands the OpenVINO plugin (its model's constants after the loader's
        int8 widening; the VAE's encoder too), the analogue of a torch module's tensors."""
        return sum(m.weight_bytes for m in self._models())

    def disk_nbytes(self) -> int:
        """Bytes of this component's ``openvino_model.bin`` file(s) on disk."""
        return sum(m.disk_bytes for m in self._models())

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class OVUNet(_Part):
    """Stands in for ``UNet2DConditionModel`` (``forward`` as the pipelines call it)."""

    def __init__(self, model: OVModel, config) -> None:
        super().__init__(model, config)
        if config.get("addition_embed_type") == "text_time":  # SDXL pipelines check the add-embedding width
            linear = types.SimpleNamespace(in_features=config["projection_class_embeddings_input_dim"])
            self.add_embedding = types.SimpleNamespace(linear_1=linear)

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, timestep_cond: Tensor | None = None,
                added_cond_kwargs: dict | None = None, return_dict: bool = True, **_unused):  # fmt: skip
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        batch = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
        named = {"sample": sample.float(), "timestep": t, "encoder_hidden_states": encoder_hidden_states.float()}
        if timestep_cond is not None:
            named["timestep_cond"] = timestep_cond.float()
        for key, value in (added_cond_kwargs or {}).items():
            named[key] = value.float()
        out = self.ov.run(**named)["out_sample"]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class OVTextEncoder(_Part):
    """Stands in for ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (hidden states always available)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool = True, **_unused):  # fmt: skip
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        out = self.ov.run(input_ids=input_ids.long())
        hidden = tuple(out[f"hidden_states.{i}"] for i in range(self.config.num_hidden_layers + 1))
        hidden = hidden if output_hidden_states else None
        if "text_embeds" in out:
            result = CLIPTextModelOutput(text_embeds=out["text_embeds"], last_hidden_state=out["last_hidden_state"],
                                         hidden_states=hidden)  # fmt: skip
        else:
            result = BaseModelOutputWithPooling(last_hidden_state=out["last_hidden_state"],
                                                pooler_output=out["pooler_output"], hidden_states=hidden)  # fmt: skip
        return result if return_dict else result.to_tuple()


class OVVae(_Part):
    """Stands in for ``AutoencoderKL`` / ``AutoencoderTiny``: ``decode`` (and ``encode`` with a ``vae_encoder/``)."""

    def __init__(self, decoder: OVModel, encoder: OVModel | None, config) -> None:
        super().__init__(decoder, config)
        self.encoder_ov = encoder

    def decode(self, z: Tensor, return_dict: bool = True, generator=None, **_unused):
        from diffusers.models.autoencoders.vae import DecoderOutput

        sample = self.ov.run(latent_sample=z.float())["sample"]
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def encode(self, x: Tensor, return_dict: bool = True, **_unused):
        if self.encoder_ov is None:
            raise QdiffError("this OpenVINO folder has no vae_encoder/ (export it with --vae-encoder)")
        out = self.encoder_ov.run(sample=x.float())
        if "latent_sample" in out:
            from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

            result = AutoencoderTinyOutput(latents=out["latent_sample"])
        else:
            from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            result = AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(out["latent_parameters"]))
        return result if return_dict else result.to_tuple()


def read_ov_manifest(folder: Path) -> dict[str, Any]:
    """``qdiff_openvino.json`` checked for format, version and field types; errors name the file."""
    from qdiff.export.checks import json_object

    path = folder / OV_MANIFEST
    if not path.is_file():
        raise QdiffError(f"{folder} is not a qdiff OpenVINO folder (no {OV_MANIFEST}; write one with export-openvino)")
    doc = json_object(path, path.read_bytes())
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        got = (doc.get("format"), doc.get("format_version"))
        raise QdiffError(f"{path}: not a {FORMAT} manifest of version {FORMAT_VERSION} (got {got})")
    for key in ("components", "files"):
        if not isinstance(doc.get(key), dict):
            raise QdiffError(f"{path}: field {key!r} missing or not a mapping")
    for name, entry in doc["components"].items():
        if not isinstance(entry, dict) or entry.get("precision") not in PRECISIONS:
            raise QdiffError(f"{path}: components.{name}: expected {{xml, precision in {PRECISIONS}}}")
    if type(doc.get("dynamic_quantization_group_size")) is not int:
        raise QdiffError(f"{path}: dynamic_quantization_group_size must be an integer")
    return doc


def verify_ov_folder(folder: Path, doc: dict[str, Any]) -> None:
    """Every file listed with its sha256, none unlisted, no link, no path outside (the export checks' rules)."""
    from qdiff.export.checks import SHA256, export_files, inside
    from qdiff.utils.hashing import sha256_file

    present = {rel: p for rel, p in export_files(folder).items() if rel != OV_MANIFEST}
    listed = doc["files"]
    for rel, digest in listed.items():
        inside(folder, rel, f"{folder / OV_MANIFEST}: files")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise QdiffError(f"{folder / OV_MANIFEST}: files[{rel!r}]: expected a sha256")
        if rel not in present:
            raise QdiffError(f"{folder / rel}: listed in {OV_MANIFEST} but missing")
        if sha256_file(present[rel]) != digest:
            raise QdiffError(f"{folder / rel}: sha256 mismatch with {OV_MANIFEST} (file was modified or corrupted)")
    extra = sorted(set(present) - set(listed))
    if extra:
        raise QdiffError(f"{folder / extra[0]}: file is not listed in {OV_MANIFEST} (added after export?)")


def compile_config(precision: str, group: int | None, threads: int | None) -> dict[str, Any]:
    """The CPU plugin settings of one component: its float precision, latency mode, the denoiser's dynamic
    quantization group (other components: 0, off), threads (None: the plugin's choice)."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group if group is not None else 0
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def load_openvino(path: str | Path, precision: str | dict[str, str] | None = None, threads: int | None = None):
    """The diffusers pipeline of an OpenVINO folder, every heavy component compiled for the CPU.

    ``precision`` overrides the recorded per-component float precision (one value or ``{component: value}``).
    """
    import openvino as ov

    from qdiff.config.dtypes import cpu_bf16_native
    from qdiff.engines.openvino.precision import effective, resolve_precisions
    from qdiff.export.checks import json_object
    from qdiff.utils.machine import cpu_flags

    folder = Path(path)
    doc = read_ov_manifest(folder)
    verify_ov_folder(folder, doc)
    recorded = {name: entry["precision"] for name, entry in doc["components"].items()}
    chosen = resolve_precisions(precision, list(recorded), base=recorded)
    core = ov.Core()
    group = doc["dynamic_quantization_group_size"]
    native = cpu_bf16_native(cpu_flags())

    def model(name: str) -> OVModel:
        config = compile_config(effective(chosen[name], native), group if name == "unet" else None, threads)
        return OVModel(core, folder / name / XML, config)

    def config(name: str) -> dict[str, Any]:
        return json_object(folder / name / "config.json", (folder / name / "config.json").read_bytes())

    index = json_object(folder / "model_index.json", (folder / "model_index.json").read_bytes())
    parts: dict[str, Any] = {"unet": OVUNet(model("unet"), _frozen(config("unet")))}
    for name in ("text_encoder", "text_encoder_2"):
        if name in doc["components"]:
            parts[name] = OVTextEncoder(model(name), _text_config(config(name)))
    encoder = model("vae_encoder") if "vae_encoder" in doc["components"] else None
    parts["vae"] = OVVae(model("vae_decoder"), encoder, _frozen(config("vae_decoder")))
    pipe = _pipeline(folder, index, parts)
    if isinstance(doc.get("recipe"), dict):  # what qdiff's tools read: sampler defaults, the variant's name
        from qdiff.config.plan import Plan
        from qdiff.config.recipe import Recipe
        from qdiff.quant.transform import QuantInfo, set_info

        plan = Plan.from_dict(doc["plan"]) if isinstance(doc.get("plan"), dict) else None
        set_info(parts["unet"], QuantInfo(Recipe.from_dict(doc["recipe"]), plan, doc.get("base_model")))
    return pipe


def _frozen(data: dict[str, Any]):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(data)


def _text_config(data: dict[str, Any]):
    from transformers import AutoConfig

    kind = data.get("model_type", "clip_text_model")
    return AutoConfig.for_model(kind, **{k: v for k, v in data.items() if k != "model_type"})


def _pipeline(folder: Path, index: dict[str, Any], parts: dict[str, Any]):
    """The pipeline class ``model_index.json`` names, built from ``parts`` plus its scheduler and tokenizers."""
    import diffusers
    import transformers

    from qdiff.sched.qsched import SCHEDULE_FILE, Schedule, apply_schedule

    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise QdiffError(f"{folder / 'model_index.json'}: _class_name {index.get('_class_name')!r} is not a pipeline")
    kwargs: dict[str, Any] = {}
    for name in inspect.signature(cls.__init__).parameters:
        entry = index.get(name)
        if name in parts:
            kwargs[name] = parts[name]
        elif isinstance(entry, list) and len(entry) == 2 and entry[1] and (folder / name).is_dir():
            library = diffusers if entry[0] == "diffusers" else transformers
            kwargs[name] = getattr(library, entry[1]).from_pretrained(folder / name, local_files_only=True)
        elif isinstance(entry, list):
            kwargs[name] = None
        elif name in index and not name.startswith("_"):
            kwargs[name] = index[name]
    pipe = cls(**kwargs)
    sidecar = folder / "scheduler" / SCHEDULE_FILE
    if sidecar.is_file():
        apply_schedule(pipe, Schedule.load(sidecar))
    return pipe
