"""``qdiff export-openvino EXPORT OUT``: a qdiff export as an OpenVINO pipeline folder (optimum-intel's layout).

The qdiff export stays the single source of truth: nothing is re-calibrated. Its denoiser's plan, codes, scales and
static ranges become OpenVINO's int8 patterns (:mod:`qdiff.engines.openvino.trace`), the float-kept layers stay
float, and the text encoders and VAE are converted as they are. Each component is converted, saved and dropped
before the next one, from a pipeline loaded with the exact torch backend (``kernel="torch"``: the stored codes
only, no backend copy), so peak memory is about the quantized pipeline plus one converted component.

Layout (``docs/openvino.md``)::

    OUT/model_index.json, scheduler/ (qsched.json too), tokenizer*/     as the pipeline saves them
    OUT/unet/openvino_model.{xml,bin}, config.json                       the quantized denoiser
    OUT/text_encoder*/openvino_model.{xml,bin}, config.json              CLIP text encoders
    OUT/vae_decoder/openvino_model.{xml,bin}, config.json (vae_encoder/ with ``vae_encoder=True``)
    OUT/qdiff_openvino.json                                              manifest: source, precisions, sha256
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qdiff.engines.openvino import OV_MANIFEST
from qdiff.engines.openvino.components import Component, text_encoder_component, unet_component, vae_components
from qdiff.engines.openvino.convert import to_openvino
from qdiff.engines.openvino.precision import resolve_precisions
from qdiff.errors import QdiffError
from qdiff.utils.hashing import sha256_file
from qdiff.utils.progress import progress_bar

FORMAT = "qdiff-openvino"
FORMAT_VERSION = 1
XML = "openvino_model.xml"
COPIED = ("scheduler", "tokenizer", "tokenizer_2")  # saved by the components themselves (a schedule: qsched.json)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def export_openvino(
    source: str | Path,
    out: str | Path,
    *,
    precision: str | Mapping[str, str] | None = None,
    vae_encoder: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the OpenVINO folder of ``source`` into ``out`` (atomic: a temp folder renamed at the end); returns
    ``out``. ``source``: a qdiff export (its quantization is carried over), or any float model spec
    (``builtin:shapes``, a diffusers folder: a float OpenVINO pipeline, the ``openvino-fp32`` baseline).

    ``precision``: the float precision each component's non-quantized parts run in (``"f32"`` / ``"bf16"``), one
    value for all or ``{component: value}`` over the defaults of :mod:`qdiff.engines.openvino.precision`.
    ``vae_encoder``: also convert the VAE encoder (image-to-image pipelines need it).
    """
    import torch

    from qdiff.export.load import load_export
    from qdiff.export.manifest import MANIFEST, read_manifest
    from qdiff.export.resolve import load_pipeline, place
    from qdiff.export.save import atomic_folder

    src, out = Path(source), Path(out)
    manifest = read_manifest(src) if (src / MANIFEST).is_file() else None
    if manifest is not None:
        if manifest.get("denoiser_only"):
            raise QdiffError(f"{src}: a denoiser-only export has no text encoders or VAE; export a pipeline folder")
        pipe = load_export(src, kernel="torch")  # the stored codes only, no backend copy
    else:
        pipe = load_pipeline(str(source))
    stored = {t.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module) for t in m.parameters()}
    half = bool(stored & {torch.float16, torch.bfloat16})  # float weights kept at the source's 16 bits on disk
    place(pipe, "cpu", torch.float32)  # float parts traced in float32
    with atomic_folder(out, overwrite) as tmp:
        write_openvino(pipe, tmp, precision=precision, vae_encoder=vae_encoder, source=src if manifest else None,
                       progress=progress, store_half=half)  # fmt: skip
    return out


def write_openvino(
    pipe,
    folder: Path,
    *,
    precision: str | Mapping[str, str] | None = None,
    vae_encoder: bool = False,
    source: Path | None = None,
    progress: bool = True,
    store_half: bool = False,
    transform_unet: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Write ``pipe`` (a qdiff-quantized or float diffusers pipeline, float32) as an OpenVINO folder into the
    existing empty ``folder``; returns the manifest. ``source``: the qdiff export it was loaded from (recorded);
    ``store_half``: float weights stored as f16 (a float16 source loses nothing); ``transform_unet``: applied to the
    converted UNet before it is saved (``openvino-nncf-int8``: NNCF's quantize)."""
    import openvino as ov

    from qdiff.export.manifest import MANIFEST, hash_tree, read_manifest
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.transform import get_info

    attr, den = find_denoiser(pipe)
    if type(den).__name__ != "UNet2DConditionModel":
        raise QdiffError(f"OpenVINO export supports UNet pipelines (SD 1.x/2.x, SDXL, LCM), not {type(den).__name__}")
    parts = _components(pipe, vae_encoder)
    precisions = resolve_precisions(precision, [c.folder for c in parts])
    group = dynamic_quantization_group(den)
    for part in progress_bar(parts, desc="OpenVINO export", unit="component", enabled=progress):
        model = to_openvino(part)
        if part.folder == "unet":
            model.set_rt_info(str(group), ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
            if transform_unet is not None:
                model = transform_unet(model)
        (folder / part.folder).mkdir()
        ov.save_model(model, folder / part.folder / XML, compress_to_fp16=store_half)
        _write_config(part, folder / part.folder)
        del model
        gc.collect()
    for name in COPIED:
        component = getattr(pipe, name, None)
        if component is not None:
            component.save_pretrained(folder / name)
    _write_model_index(pipe, folder, [c.folder for c in parts])
    info = get_info(den)
    source_manifest = read_manifest(source) if source is not None else {}
    source_doc = None if source is None else {"path": str(source), "qdiff_json_sha256": sha256_file(source / MANIFEST)}
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qdiff_version": _qdiff_version(),
        "openvino_version": ov.get_version(),
        "source": source_doc,
        "base_model": source_manifest.get("base_model", getattr(pipe, "name_or_path", None)),
        "pipeline_class": type(pipe).__name__,
        "recipe": None if info is None else info.recipe.to_dict(),  # sampler defaults, the variant's name
        "plan": None if info is None or info.plan is None else info.plan.to_dict(),
        "components": {c.folder: {"xml": f"{c.folder}/{XML}", "precision": precisions[c.folder]} for c in parts},
        "dynamic_quantization_group_size": group,
        "dynamic_quantization_layers": dynamic_quantization_report(den, group),  # Linear layers per mode
        "files": hash_tree(folder),
    }
    (folder / OV_MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _components(pipe, vae_encoder: bool) -> list[Component]:
    tokens = int(pipe.tokenizer.model_max_length)
    enc2 = getattr(pipe, "text_encoder_2", None)
    pooled = int(enc2.config.projection_dim) if enc2 is not None else None
    side = int(pipe.unet.config.sample_size)
    parts = [unet_component(pipe.unet, tokens, pooled, sizes=(2, min(side, 16)))]
    for name in TEXT_ENCODERS:
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            if getattr(encoder.config, "quantization_config", None) is not None:
                raise QdiffError(f"OpenVINO export: {name} is quantized by another library (bitsandbytes)")
            parts.append(text_encoder_component(name, encoder, tokens))
    return parts + vae_components(pipe.vae, min(side, 16), vae_encoder)


DQ_MULTIPLE = 32  # the CPU plugin quantizes a MatMul at run time only when its group size is a multiple of this


def dynamic_quantization_group(den) -> int:
    """OpenVINO's ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` for the denoiser (one value for the whole model).

    0 when no quantized Linear has dynamic activations. K when all of them share one input width K that is a multiple
    of 32: per token, as qdiff quantizes (measured equal to qdiff's reference to float rounding). Otherwise the largest
    power of two >= 32 dividing every K, else 32: the plugin then quantizes each token per group of that many channels
    (finer than qdiff's per-token scale, so closer to float), and leaves layers whose K is not a multiple of the group
    in float (measured: K=72 with group 72 runs weight-only). :func:`dynamic_quantization_report` counts each kind.
    """
    widths = _dynamic_widths(den)
    if not widths:
        return 0
    if len(widths) == 1 and widths[0] % DQ_MULTIPLE == 0:
        return widths[0]
    g = math.gcd(*widths)
    power = g & -g  # the largest power of two dividing every K
    return power if power >= DQ_MULTIPLE else DQ_MULTIPLE


def dynamic_quantization_report(den, group: int) -> dict[str, int]:
    """How the quantized Linear layers with dynamic activations run under ``group``: per token, per group, or with
    float activations (K not a multiple of the group)."""
    widths = _dynamic_widths(den)
    return {
        "per_token": sum(group == k for k in widths),
        "per_group": sum(group != k and k % group == 0 for k in widths) if group else 0,
        "float_activations": sum(not group or k % group != 0 for k in widths),
    }


def _dynamic_widths(den) -> list[int]:
    from qdiff.quant.modules import QuantLinear

    return [
        m.in_features_2d
        for m in den.modules()
        if isinstance(m, QuantLinear) and m.state == "frozen" and m.qcfg.a_bits is not None and not m.qcfg.static_act
    ]


def _write_config(part: Component, folder: Path) -> None:
    """The source module's own config (diffusers or transformers) as ``config.json`` beside the IR."""
    module = next(iter(part.module.children()))
    config = module.config
    if hasattr(config, "to_dict"):  # transformers
        data = config.to_dict()
    else:  # diffusers FrozenDict
        data = {**dict(config), "_class_name": type(module).__name__}
    data.pop("quantization_config", None)  # the IR carries the quantization; loaders must not look for a backend
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _write_model_index(pipe, folder: Path, folders: list[str]) -> None:
    """The pipeline's ``model_index.json`` with the text encoders this folder does not hold set to null
    (optimum-intel reads ``_class_name``, the scheduler and tokenizer entries; qdiff's loader the same)."""
    pipe.save_config(folder)
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    for key in TEXT_ENCODERS:
        if key in index and key not in folders:
            index[key] = [None, None]
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _qdiff_version() -> str:
    import qdiff

    return qdiff.__version__
