"""Streaming quantization: checkpoint on disk -> qdiff export, one layer in memory at a time.

For recipes that need no forward pass of the float model (dynamic activations, or static ones with captured
ranges; plans), the denoiser is built on the meta device from its ``config.json`` (no weights), its layers and
layer specs are derived exactly as :func:`qdiff.quantize` derives them, and the checkpoint is walked tensor by
tensor (:mod:`qdiff.export.checkpoint`) in file order:

* a quantized layer: its weight and bias are read, become one float ``nn.Linear`` / ``nn.Conv2d`` in the on-disk
  dtype or ``dtype`` (the quantizer upcasts to fp32 internally, exactly as on a loaded pipeline), go through
  ``quant_module_for`` + static ranges + ``freeze`` and the frozen layer's tensors are written;
* any other tensor is copied through in its on-disk dtype (or cast to ``dtype``);
* the recipe's ``loras`` are fused on the way: each tensor a LoRA changes gets its delta as it is read
  (:mod:`qdiff.lora.stream`, the same bytes as diffusers' ``fuse_lora`` on the loaded model).

Tensors go straight into planned safetensors shards (:mod:`qdiff.export.shards`), so peak memory is about one
layer. The export equals ``qdiff.quantize`` + ``qdiff.save`` of the same pipeline loaded in the checkpoint's dtype
(``load_pipeline(src, torch_dtype=dtype)`` with ``dtype``), tensor for tensor and byte for byte. Other pipeline
parts are copied file by file (safetensors / JSON / text / sentencepiece), except the scheduler, re-saved with the
recipe's sampler swap, and an ``AutoencoderTiny`` config, written without the key diffusers adds and then rejects
(``qdiff.models.autoencoder_tiny``), as ``qdiff.save`` writes it. A denoiser folder or a single ``.safetensors``
file gives a denoiser-only export (manifest ``denoiser_only: true``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import torch
from torch import nn

from qdiff.config.layer import LayerQuant
from qdiff.config.plan import Plan
from qdiff.config.recipe import Recipe, TextEncoderConfig
from qdiff.errors import QdiffError
from qdiff.export.card import write_card, write_denoiser_files
from qdiff.export.checkpoint import CONFIG_NAME, MODEL_INDEX, CheckpointReader, denoiser_subfolder, open_checkpoint
from qdiff.export.load import _denoiser_class
from qdiff.export.manifest import (
    FORBIDDEN_SUFFIXES,
    MAX_SHARD_BYTES,
    WEIGHTS_FILE,
    WEIGHTS_METADATA,
    build_manifest,
    hash_tree,
    layer_entry,
    write_manifest,
)
from qdiff.export.save import atomic_folder
from qdiff.export.shards import ShardedWriter, TensorSpec
from qdiff.models.adapters import get_adapter
from qdiff.models.autoencoder_tiny import clean_config
from qdiff.models.families import current_registry
from qdiff.quant.modules import QuantConv2d, quant_module_for
from qdiff.quant.ranges import static_qparams
from qdiff.quant.transform import build_frozen_shells, layer_specs
from qdiff.utils.finite import NonFiniteError, check_tensor
from qdiff.utils.progress import progress_bar

COPY_SUFFIXES = (".safetensors", ".json", ".txt", ".model")  # .model: a sentencepiece vocabulary (protobuf data)


class Ranges(Protocol):
    """What is read of :class:`qdiff.calib.stats.CapturedStats` (calib sits above export in the layering)."""

    layers: dict[str, Any]
    meta: dict[str, Any]


@dataclass(frozen=True)
class Source:
    """Where the float model is: ``weights`` is what ``open_checkpoint`` opens; ``pipeline`` is None for a
    denoiser-only source."""

    weights: Path
    config: dict[str, Any]
    pipeline: Path | None


def can_stream(recipe: Recipe, plan: Plan | None = None, ranges: Ranges | None = None) -> tuple[bool, str]:
    """Whether ``stream_quantize`` can produce this export (no forward pass of the float model needed), and why.

    Streams: dynamic activations, activations kept float, or static ones with ``ranges``; with or without a plan.
    Does not: ``bos_aware``, text-encoder quantization, Q-Sched, static activations without ranges.
    """
    if recipe.bos_aware:
        return False, "recipe.bos_aware needs the BOS probe, a run of the float pipeline over prompts"
    if recipe.text_encoders != TextEncoderConfig():
        return False, (
            "the recipe quantizes a text encoder (text_encoders section): the CLIP BOS probe runs the encoder over "
            "prompts and the T5 modes quantize through bitsandbytes while transformers loads the whole encoder"
        )
    if recipe.qsched.enabled:
        return False, "recipe.qsched is enabled: Q-Sched draws images with the quantized pipeline to fit its schedule"
    from qdiff.lora.files import has_text_encoder_part

    changed = next((lora.path for lora in recipe.loras if has_text_encoder_part(lora)), None)
    if changed is not None:
        return False, f"the LoRA {changed} also changes a text encoder, which is fused in memory"
    act = recipe.activations
    quantized_acts = any(b.a_bits is not None for b in plan.layers.values()) if plan is not None else act.bits != 16
    if act.mode == "static" and quantized_acts:
        if ranges is None:
            return False, "static activations need ranges from a calibration run (pass those of qdiff calibrate)"
        return True, "static activations from the captured ranges: no forward pass of the float model"
    return True, "dynamic activations: no forward pass of the float model"


def resolve_source(source: str | Path, config: str | Path | None = None) -> Source:
    """A pipeline folder (``model_index.json``), a denoiser folder (``config.json``; also a folder holding just a
    ``unet/`` or ``transformer/`` one) or a ``.safetensors`` file with ``config`` (a denoiser folder or pipeline
    folder holding the config) or a ``config.json`` beside it."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MODEL_INDEX).is_file() and not (path / CONFIG_NAME).is_file():
            sub = path / denoiser_subfolder(path)
            return Source(sub, _read_config(sub / CONFIG_NAME), path)
        if (path / CONFIG_NAME).is_file():
            return Source(path, _read_config(path / CONFIG_NAME), None)
        subs = [path / a for a in current_registry().denoiser_attrs if (path / a / CONFIG_NAME).is_file()]
        if len(subs) == 1:  # a folder holding only the denoiser's subfolder (scripts/make_real_checkpoint.py)
            return Source(subs[0], _read_config(subs[0] / CONFIG_NAME), None)
        raise QdiffError(f"{path}: neither a pipeline folder ({MODEL_INDEX}) nor a model folder ({CONFIG_NAME})")
    if path.suffix.lower() in FORBIDDEN_SUFFIXES:
        raise QdiffError(f"{path}: refusing to load a {path.suffix} file (qdiff loads only safetensors and JSON)")
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        raise QdiffError(f"{path}: not a model folder or a .safetensors checkpoint")
    folder = Path(config).expanduser() if config is not None else path.parent
    if (folder / MODEL_INDEX).is_file() and not (folder / CONFIG_NAME).is_file():
        folder = folder / denoiser_subfolder(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise QdiffError(f"{path}: single-file checkpoint needs the denoiser's {CONFIG_NAME} (pass config=FOLDER)")
    return Source(path, _read_config(folder / CONFIG_NAME), None)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QdiffError(f"{path}: cannot read the model config ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise QdiffError(f"{path}: not a diffusers model config (no _class_name)")
    return config


def stream_quantize(
    source: str | Path,
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    plan: Plan | str | Path | None = None,
    ranges: Ranges | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: float = MAX_SHARD_BYTES,
    config: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Quantize the checkpoint at ``source`` into the export folder ``out`` without loading the float model.

    ``source``: a diffusers pipeline folder, a denoiser folder or a ``.safetensors`` file (``config``: where its
    config.json is). ``recipe``/``plan``/``ranges`` as in :func:`qdiff.quantize`; :func:`can_stream` must allow them.
    ``dtype``: the float dtype the denoiser is read in (as ``load_pipeline(torch_dtype=...)``: float tensors cast
    before quantizing and in the export); default: each tensor's on-disk dtype. Writing is atomic (a temp folder
    beside ``out``, renamed at the end). Returns ``out``.
    """
    from qdiff.config.dtypes import as_torch_dtype

    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    plan = plan if plan is None or isinstance(plan, Plan) else Plan.load(plan)
    ok, reason = can_stream(recipe, plan, ranges)
    if not ok:
        raise QdiffError(f"cannot stream this quantization: {reason}")
    src = resolve_source(source, config)
    out = Path(out)
    if out.exists() and not overwrite:
        raise QdiffError(f"output folder {out} already exists (use --overwrite to replace it)")
    inputs = [p.resolve() for p in (src.weights, src.pipeline) if p is not None]
    if any(out.resolve() == p or out.resolve() in p.parents or p in out.resolve().parents for p in inputs):
        raise QdiffError(f"output folder {out} overlaps the source {source}; write the export elsewhere")
    with open_checkpoint(src.weights) as reader:
        job = _Job.plan(src, reader, recipe, plan, ranges, as_torch_dtype(dtype))
        parts = _PipelineParts.scan(src.pipeline, job.attr) if src.pipeline is not None else None
        with atomic_folder(out, overwrite) as tmp:
            (tmp / job.attr).mkdir()
            job.den.save_config(tmp / job.attr)  # config.json of the float architecture, as qdiff.save writes it
            weights = job.write(reader, tmp / job.attr, max_shard_bytes, progress)
            if parts is not None:
                parts.write(tmp, recipe)
            manifest = build_manifest(
                base_model=str(source),
                pipeline_class=parts.pipeline_class if parts is not None else None,
                torch_dtype=job.torch_dtype,
                denoiser={
                    "attr": job.attr,
                    "class": job.cls_name,
                    "family": job.family,
                    "weights": f"{job.attr}/{weights}",
                },  # fmt: skip
                recipe=recipe.to_dict(),
                plan=None if plan is None else plan.to_dict(),
                layers=job.layers,
                schedule=None,
                files={},
                denoiser_only=parts is None,
            )
            write_denoiser_files(tmp / job.attr, weights, recipe.name)  # quantization_config + diffusers index
            write_card(tmp, manifest)  # README.md, hashed with the rest
            manifest["files"] = hash_tree(tmp)
            write_manifest(tmp, manifest)
    return out


@dataclass(frozen=True)
class _Job:
    """The planned denoiser export: quantized layers with their specs and static ranges, the output tensors."""

    attr: str  # pipeline attribute and export subfolder
    cls_name: str
    family: str
    den: nn.Module  # the architecture on meta, quantized layers replaced by frozen shells
    specs: dict[str, LayerQuant]
    float_layers: dict[str, nn.Module]  # the meta float layers (geometry only)
    acts: dict[str, tuple[list, list]]  # static layers: (scales, zero-points) per input part
    order: list[tuple[str, bool]]  # (tensor name, False) copied / (layer name, True) quantized, in file order
    out_specs: list[TensorSpec]  # every output tensor in production order
    kernel: str
    cast: torch.dtype | None  # float tensors are read in this dtype (None: as on disk)
    torch_dtype: str
    layers: dict[str, Any]  # the manifest's layer table
    deltas: Any = None  # qdiff.lora.stream.LayerDeltas of the recipe's LoRAs, added to each tensor as it is read

    @classmethod
    def plan(cls, src: Source, reader: CheckpointReader, recipe: Recipe, plan: Plan | None, ranges,
             cast: torch.dtype | None) -> _Job:  # fmt: skip
        from accelerate import init_empty_weights

        config = {k: v for k, v in src.config.items() if k != "_name_or_path"}
        den_cls, arch_attr = _denoiser_class_of(config["_class_name"], src.weights)
        if src.pipeline is not None and src.weights.name != arch_attr:
            raise QdiffError(f"{src.weights}: a {den_cls.__name__} belongs in the pipeline attribute {arch_attr!r}")
        with init_empty_weights(include_buffers=False):
            den = den_cls.from_config(config)
        arch = get_adapter(den)
        specs = layer_specs(arch.layers(den), recipe, plan)
        if not specs:
            raise QdiffError("nothing to quantize: the recipe/plan selects no layer of this model")
        _check_keys(reader, den.state_dict())
        float_layers = {name: den.get_submodule(name) for name in specs}
        shells = build_frozen_shells(den, specs, None)
        acts = static_qparams(shells, recipe, ranges) if any(q.static_act for q in specs.values()) else {}
        owner = {f"{name}.{leaf}": name for name in specs for leaf in ("weight", "bias")}

        def stored(key: str) -> torch.dtype:  # the dtype a checkpoint tensor is read and written in
            dtype = reader.dtype(key)
            return cast if cast is not None and dtype.is_floating_point else dtype

        order: list[tuple[str, bool]] = []
        out_specs: list[TensorSpec] = []
        for key in reader.keys():
            layer = owner.get(key)
            if layer is None:
                order.append((key, False))
                out_specs.append(TensorSpec(key, reader.shape(key), stored(key)))
            elif key == f"{layer}.weight":  # the layer is produced where its weight is in the file
                order.append((layer, True))
                for leaf, t in shells[layer].state_dict().items():
                    name = f"{layer}.{leaf}"  # the bias as read; codes and scales in their own dtypes
                    out_specs.append(TensorSpec(name, tuple(t.shape), stored(name) if name in reader else t.dtype))
        first_float = next(n for n, p in den.named_parameters() if p.is_floating_point())
        from qdiff.lora.stream import LayerDeltas  # the recipe's LoRAs, fused layer by layer as they are read

        deltas = LayerDeltas.plan(den_cls, config, arch.attr, src.pipeline, recipe.loras) if recipe.loras else None
        return cls(
            attr=arch.attr, cls_name=den_cls.__name__, family=arch.family, den=den, specs=specs,
            float_layers=float_layers, acts=acts, order=order, out_specs=out_specs, kernel=recipe.kernel, cast=cast,
            torch_dtype=str(stored(first_float)).removeprefix("torch."),
            layers={name: layer_entry(m) for name, m in shells.items()}, deltas=deltas,
        )  # fmt: skip

    def write(self, reader: CheckpointReader, folder: Path, max_shard_bytes: float, progress: bool) -> str:
        """Stream every output tensor into ``folder``; returns the file a reader opens (single file or index)."""
        writer = ShardedWriter(folder, WEIGHTS_FILE, self.out_specs, max_shard_bytes, WEIGHTS_METADATA)
        bar = progress_bar(total=len(self.specs), desc="quantizing layers", unit="layer", enabled=progress)
        try:
            for name, quantized in self.order:
                if quantized:
                    self._quantize_layer(reader, writer, name)
                    bar.update()
                else:
                    writer.write(name, self._read(reader, name))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        return writer.entry_file

    def _quantize_layer(self, reader: CheckpointReader, writer: ShardedWriter, name: str) -> None:
        """Read one layer, quantize and freeze it exactly as ``qdiff.quantize`` does, write its tensors."""
        meta = self.float_layers[name]
        weight = self._read(reader, f"{name}.weight", name)
        bias = self._read(reader, f"{name}.bias", name) if meta.bias is not None else None
        qmod = quant_module_for(_float_layer(meta, weight, bias), self.specs[name])
        del weight, bias
        if name in self.acts:
            qmod.set_act_qparams(*self.acts[name])
        qmod.kernel = self.kernel
        qmod.freeze()
        for leaf, tensor in qmod.state_dict().items():
            writer.write(f"{name}.{leaf}", tensor)

    def _read(self, reader: CheckpointReader, key: str, layer: str | None = None) -> torch.Tensor:
        """One checkpoint tensor in its read dtype; QdiffError naming the file, tensor and layer on NaN / Inf."""
        tensor = reader.get(key)
        if self.cast is not None and tensor.is_floating_point():
            tensor = tensor.to(self.cast)  # as diffusers' torch_dtype: before the finite check (fp16 may overflow)
        if self.deltas is not None:  # tensors no LoRA touches come back as they are
            tensor = self.deltas.apply(key, tensor)  # the fused LoRAs, as fuse_lora adds them in this dtype
        try:
            check_tensor(tensor)
        except NonFiniteError as exc:
            where = f"of layer {layer!r} " if layer else ""
            raise QdiffError(f"{reader.file_of(key)}: tensor {key!r} {where}has {exc}; non-finite weights would "
                             "reach every image, fix the checkpoint") from None  # fmt: skip
        return tensor


def _denoiser_class_of(cls_name: str, where: Path) -> tuple[type, str]:
    """(diffusers class, pipeline attribute) of a denoiser class the family registry declares."""
    arch = next((a for a in current_registry().architectures if cls_name in a.classes), None)
    if arch is None:
        supported = ", ".join(current_registry().denoiser_classes)
        raise QdiffError(f"{where}: denoiser class {cls_name!r} is not supported (supported: {supported})")
    return _denoiser_class(cls_name, arch.attr, where), arch.attr


def _check_keys(reader: CheckpointReader, expected: dict[str, torch.Tensor]) -> None:
    """The checkpoint must hold exactly the float model's tensors, with the config's shapes (headers only)."""
    missing = [k for k in expected if k not in reader]
    unexpected = sorted(set(reader.keys()) - set(expected))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        what = "has no tensor" if missing else "has a tensor the config does not"
        raise QdiffError(f"{reader.source}: checkpoint {what} {key!r} ({len(missing)} missing, {len(unexpected)} "
                         "unexpected; diffusers key names are needed)")  # fmt: skip
    for key, ref in expected.items():
        if reader.shape(key) != tuple(ref.shape):
            raise QdiffError(f"{reader.file_of(key)}: tensor {key!r} has shape {reader.shape(key)}, the config "
                             f"gives {tuple(ref.shape)}")  # fmt: skip


def _float_layer(meta: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A float ``nn.Linear`` / ``nn.Conv2d`` with the meta layer's geometry holding the on-disk tensors (no copy)."""
    if isinstance(meta, nn.Linear):
        layer = nn.Linear(meta.in_features, meta.out_features, bias=bias is not None, device="meta")
    elif isinstance(meta, nn.Conv2d):
        layer = nn.Conv2d(**QuantConv2d.conv_args(meta), bias=bias is not None, device="meta")
    else:
        raise QdiffError(f"cannot quantize a {type(meta).__name__}")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer.eval()


class _PipelineParts:
    """The non-denoiser parts of a pipeline folder: component folders to copy, the scheduler to re-save."""

    def __init__(self, folder: Path, index: dict[str, Any], components: list[str]) -> None:
        self.folder, self.index, self.components = folder, index, components

    @property
    def pipeline_class(self) -> str | None:
        return self.index.get("_class_name")

    @classmethod
    def scan(cls, folder: Path, attr: str) -> _PipelineParts:
        """Read model_index.json and refuse any pickle file before anything is written."""
        try:
            index = json.loads((folder / MODEL_INDEX).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QdiffError(f"{folder / MODEL_INDEX}: cannot read ({exc})") from None
        if not isinstance(index, dict):
            raise QdiffError(f"{folder / MODEL_INDEX}: expected a JSON object")
        components = [
            name for name, value in index.items()
            if not name.startswith("_") and name != attr and isinstance(value, list) and len(value) == 2
            and value[0] is not None and (folder / name).is_dir()
        ]  # fmt: skip
        for p in sorted(p for name in components for p in (folder / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in FORBIDDEN_SUFFIXES:
                raise QdiffError(f"{p}: refusing to load a {p.suffix} file (qdiff loads only safetensors and JSON)")
        return cls(folder, index, components)

    def write(self, tmp: Path, recipe: Recipe) -> None:
        import diffusers

        from qdiff.models.schedulers import apply_sampler_scheduler

        index = dict(self.index)
        for name in self.components:
            if name != "scheduler":
                _copy_component(self.folder / name, tmp / name)
                clean_config(tmp / name)  # as qdiff.save writes it: no key diffusers adds and rejects
                continue
            library, cls_name = index[name]
            scheduler_cls = getattr(diffusers, str(cls_name), None)
            if scheduler_cls is None:
                raise QdiffError(f"{self.folder / MODEL_INDEX}: scheduler class {cls_name!r} is not in diffusers")
            holder = SimpleNamespace(scheduler=scheduler_cls.from_pretrained(str(self.folder), subfolder=name))
            apply_sampler_scheduler(holder, recipe.sampler)  # the recipe's scheduler swap, as qdiff.quantize
            holder.scheduler.save_pretrained(tmp / name)
            index[name] = [library, type(holder.scheduler).__name__]
        index.update(_diffusers_version=diffusers.__version__, _name_or_path=str(self.folder))
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_component(src: Path, dst: Path) -> None:
    """Copy safetensors / JSON / text / sentencepiece files (kernel copy, nothing loaded); skip anything else."""
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.suffix.lower() in COPY_SUFFIXES:
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
