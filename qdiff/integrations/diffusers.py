"""qdiff as a diffusers quantization backend: ``quant_method: "qdiff"``.

``import qdiff.integrations.diffusers`` adds ``"qdiff"`` to diffusers' ``AUTO_QUANTIZER_MAPPING`` and
``AUTO_QUANTIZATION_CONFIG_MAPPING`` (the registration is the import's only side effect). Then:

* **load an export** — its denoiser ``config.json`` carries ``quantization_config`` and a diffusers shard index
  naming the qdiff tensors files (``qdiff.export.card``), so ``from_pretrained`` routes here: the quantizer reads
  ``qdiff.json`` (version, sha256 of every file, no pickle), builds the frozen shells on the meta model, and
  reads, checks (names, shapes, dtypes, NaN/Inf) and assigns the tensors itself with ``qdiff.export.load``'s
  functions; diffusers' own tensor pass is given nothing to assign;
* **quantize on load** — ``QdiffConfig(recipe="w8a8")`` in a ``PipelineQuantizationConfig`` quantizes the loaded
  float denoiser exactly as :func:`qdiff.quantize` does; static activations take ranges from
  ``QdiffConfig(calib=DIR)`` (a ``qdiff calibrate`` folder);
* **save** — ``pipe.save_pretrained(DIR)`` writes a qdiff export: every denoiser qdiff builds carries the
  ``save_pretrained`` of :mod:`qdiff.export.pretrained`; diffusers' own model save (``ModelMixin.save_pretrained``,
  which cannot write the manifest hashing every file of the pipeline) is refused here, pointing to :func:`qdiff.save`.
"""

from __future__ import annotations

import enum
import warnings
from pathlib import Path
from typing import Any

import torch

from qdiff.errors import QdiffError
from qdiff.export.card import QUANT_METHOD
from qdiff.export.checks import inside
from qdiff.export.manifest import MANIFEST, read_layers, read_manifest, verify_files
from qdiff.utils.lazy_imports import defer_bitsandbytes

defer_bitsandbytes()  # diffusers' quantizers import bitsandbytes (and its notices) otherwise
from diffusers.quantizers import auto as _auto  # noqa: E402
from diffusers.quantizers.base import DiffusersQuantizer  # noqa: E402
from diffusers.quantizers.quantization_config import QuantizationConfigMixin  # noqa: E402


class QdiffMethod(str, enum.Enum):
    """diffusers reads ``quant_method.value``; a str enum keeps ``== "qdiff"`` true too."""

    QDIFF = QUANT_METHOD


class QdiffConfig(QuantizationConfigMixin):
    """The qdiff quantization config diffusers stores in a denoiser's ``config.json``.

    ``recipe``: a bundled recipe name or a YAML path (quantize on load; the recipe name in an export);
    ``plan``: a per-layer Plan path (optional); ``calib``: a ``qdiff calibrate`` folder with activation ranges
    (static-activation recipes); ``format_version``: the export format (set in exports).
    """

    def __init__(
        self,
        recipe: str | None = "w8a8",
        plan: str | None = None,
        calib: str | None = None,
        format_version: int | None = None,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise QdiffError(f"QdiffConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if unknown:
            known = "recipe, plan, calib, format_version, quant_method"
            raise QdiffError(f"QdiffConfig: unknown argument {next(iter(unknown))!r} (known: {known})")
        self.quant_method = QdiffMethod.QDIFF
        self.recipe = None if recipe is None else str(recipe)
        self.plan = None if plan is None else str(plan)
        self.calib = None if calib is None else str(calib)
        self.format_version = format_version

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": QUANT_METHOD, "recipe": self.recipe}
        out.update({k: v for k in ("plan", "calib", "format_version") if (v := getattr(self, k)) is not None})
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _export_root(shard: Path) -> Path:
    """The export folder holding ``qdiff.json``: the parent of the denoiser folder the shard is in."""
    root = shard.parent.parent
    if not (root / MANIFEST).is_file():
        raise QdiffError(f"{shard.parent}: config.json says quant_method 'qdiff' but {root / MANIFEST} is missing")
    return root


class QdiffQuantizer(DiffusersQuantizer):
    """Loads qdiff exports (``pre_quantized``) and quantizes float denoisers on load."""

    requires_calibration = False
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: QdiffConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.export: tuple[Path, dict] | None = None  # (root, manifest) once the export files are verified
        self.torch_dtype: torch.dtype | None = None  # the dtype asked of from_pretrained, if any
        self.device: torch.device | None = None  # a one-device device_map, applied by qdiff after loading

    def update_device_map(self, device_map: Any) -> None:
        """One device (``"cuda"``, ``{"": 0}``) is honoured by qdiff itself, tensor by tensor, after the weights are
        read (diffusers would dispatch the model before the quantizer fills it); a split over devices is refused."""
        if device_map is None:
            return None
        devices = set(map(str, device_map.values())) if isinstance(device_map, dict) else {str(device_map)}
        if len(devices) != 1 or devices & {"auto", "balanced", "balanced_low_0", "sequential", "disk", "meta"}:
            raise QdiffError(
                f"qdiff: device_map={device_map!r} is not supported (one denoiser on one device); pass a single "
                "device or call .to(device) / enable_model_cpu_offload()"
            )
        value = next(iter(device_map.values())) if isinstance(device_map, dict) else device_map
        self.device = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
        return None

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        self.torch_dtype = torch_dtype
        return torch_dtype

    # --- both paths -------------------------------------------------------------------------------------------
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if "torch_dtype" in kwargs and not self.pre_quantized:
            from qdiff.integrations.onload import check_recipe

            check_recipe(self.quantization_config)  # before any float weight is read

    @property
    def supports_parallel_loading(self) -> bool:
        return False

    @property
    def is_serializable(self) -> bool:
        raise QdiffError(
            "ModelMixin.save_pretrained cannot write a qdiff-quantized model: use pipe.save_pretrained(DIR) or "
            "qdiff.save(pipe, DIR) (a qdiff export, loaded by qdiff.load and DiffusionPipeline.from_pretrained)"
        )

    @property
    def is_trainable(self) -> bool:
        return False

    # --- loading an export ------------------------------------------------------------------------------------
    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        """Every ``qdiff.load`` file check, before any tensor is read: manifest version and fields, no path or
        symbolic link leading outside the export, sha256, no pickle."""
        if self.pre_quantized:
            if not checkpoint_files or not isinstance(checkpoint_files[0], str | Path):
                raise QdiffError("qdiff: the export's tensors were not found (diffusion_pytorch_model index missing)")
            root = _export_root(Path(checkpoint_files[0]))
            manifest = read_manifest(root)
            verify_files(root, manifest)
            weights = inside(root, manifest["denoiser"]["weights"], f"{root / MANIFEST}: denoiser.weights")
            if weights.parent.resolve() != Path(checkpoint_files[0]).parent.resolve():
                raise QdiffError(f"{Path(checkpoint_files[0]).parent}: not the denoiser folder of {root / MANIFEST}")
            stored = manifest.get("torch_dtype", "float32")
            if self.torch_dtype is not None and str(self.torch_dtype).removeprefix("torch.") != stored:
                raise QdiffError(
                    f"{root}: the export's float tensors are {stored}; load it without dtype or with "
                    f"dtype=torch.{stored} (asked: {self.torch_dtype})"
                )
            self.export = (root, manifest)
        return loaded_keys

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        if not self.pre_quantized:
            return
        from qdiff.export.load import _denoiser_class
        from qdiff.quant.transform import build_frozen_shells

        root, manifest = self.export
        den = manifest["denoiser"]
        cls = _denoiser_class(str(den.get("class")), den.get("attr"), root / MANIFEST)
        if not isinstance(model, cls):
            raise QdiffError(f"{root / MANIFEST}: the export holds a {cls.__name__}, not a {type(model).__name__}")
        specs, bos = read_layers(manifest, root / MANIFEST)
        try:
            build_frozen_shells(model, specs, bos)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise QdiffError(f"{root / MANIFEST}: layer table does not match the denoiser config ({exc})") from None

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Pre-quantized: diffusers assigns nothing; the tensors are read and checked in the post-processing."""
        return {} if self.pre_quantized else state_dict

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        return [] if self.pre_quantized else missing_keys

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        if self.pre_quantized:
            _fill_from_export(model, *self.export, self.device)
            return model
        from qdiff.integrations.onload import quantize_denoiser

        model = quantize_denoiser(model, self.quantization_config)
        return model if self.device is None else model.to(self.device)


def _fill_from_export(model: torch.nn.Module, root: Path, manifest: dict, device: torch.device | None) -> None:
    """Read, check and assign the export's tensors into the frozen shells (as ``qdiff.load`` does), each moved to
    ``device`` as it is read."""
    from qdiff.export.load import _finish, fill_denoiser

    fill_denoiser(model, root, str(manifest["denoiser"].get("weights")), device)
    _finish(model, manifest, source=root / MANIFEST)
    model.eval()
    if manifest.get("schedule") is not None:  # pipeline-level: diffusers loads the plain scheduler
        warnings.warn(
            f"{root}: this export carries Q-Sched coefficients (scheduler/qsched.json) that diffusers' loader does "
            "not apply; qdiff.load(path) draws with them",
            stacklevel=2,
        )


def register() -> None:
    """Add the qdiff backend to diffusers' registries (idempotent; done on import)."""
    _auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QdiffQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QdiffConfig


register()
