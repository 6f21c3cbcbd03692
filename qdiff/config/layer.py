"""Per-layer quantization settings: what one quantized Linear/Conv2d does, as a frozen value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qdiff.config.bits import ACT_BITS, WEIGHT_BITS
from qdiff.errors import QdiffError

# Layer-spec versions (the ``spec_version`` key of a serialized LayerQuant; absent = 1):
#   1  the fields written so far; keys added later (``a_split``) may be missing and take their default.
#   2  every field is written and required; ``spec_version`` is explicit (export format 2).
LAYER_SPEC_VERSION = 2
LAYER_SPEC_VERSIONS = (1, 2)
SPEC_VERSION_KEY = "spec_version"


@dataclass(frozen=True)
class LayerQuant:
    """Quantization of one layer.

    Weights are symmetric (zero-point 0), per tensor / output channel / group of ``group_size``
    input elements. Activations (``a_bits``; ``None`` keeps them in floating point) are either
    ``dynamic`` (symmetric, per token for Linear and per sample for Conv2d, computed on the fly)
    or ``static`` (asymmetric per-tensor, calibrated).

    ``a_split`` (Conv2d only): input channel where the second activation part starts. The two parts of a
    concatenated input (a UNet up block's ``cat([up_path, skip])``) then get their own activation quantizers
    (Q-Diffusion's shortcut-splitting quantization, Li et al., ICCV 2023). Weights are not affected.
    """

    w_bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    method: str = "minmax"
    a_bits: int | None = 8
    a_mode: str = "dynamic"
    a_split: int | None = None

    def __post_init__(self) -> None:
        if self.w_bits not in WEIGHT_BITS:
            raise ValueError(f"w_bits must be one of {WEIGHT_BITS}, got {self.w_bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError("group_size is required with granularity='group' and only allowed there")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be > 0, got {self.group_size}")
        if self.method not in ("minmax", "mse"):
            raise ValueError(f"method must be minmax or mse, got {self.method!r}")
        if self.a_bits is not None and self.a_bits not in ACT_BITS:
            raise ValueError(f"a_bits must be one of {ACT_BITS} or None, got {self.a_bits!r}")
        if self.a_mode not in ("dynamic", "static"):
            raise ValueError(f"a_mode must be dynamic or static, got {self.a_mode!r}")
        if self.a_split is not None:
            if isinstance(self.a_split, bool) or not isinstance(self.a_split, int) or self.a_split <= 0:
                raise ValueError(f"a_split must be a positive integer or None, got {self.a_split!r}")
            if self.a_bits is None:
                raise ValueError("a_split needs quantized activations (a_bits)")

    @property
    def static_act(self) -> bool:
        return self.a_bits is not None and self.a_mode == "static"

    @property
    def split_act(self) -> bool:
        """True when activations are quantized in two channel parts (``a_split``)."""
        return self.a_bits is not None and self.a_split is not None

    def tag(self) -> str:
        """Short human label, e.g. ``W4A8``, ``W8A16``."""
        return f"W{self.w_bits}A{self.a_bits or 16}"

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``spec_version`` (the current :data:`LAYER_SPEC_VERSION`)."""
        return {SPEC_VERSION_KEY: LAYER_SPEC_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "layer spec") -> LayerQuant:
        """Read a serialized spec of any version in :data:`LAYER_SPEC_VERSIONS`; errors name ``where``.

        Unknown keys are refused (a typo or a newer writer must not be silently dropped); version 1 fills the
        fields added since with their defaults; version 2 needs every field.
        """
        if not isinstance(data, Mapping):
            raise QdiffError(f"{where}: expected a mapping of layer-spec fields, got {type(data).__name__}")
        version = data.get(SPEC_VERSION_KEY, 1)
        if type(version) is not int or version not in LAYER_SPEC_VERSIONS:
            readable = ", ".join(map(str, LAYER_SPEC_VERSIONS))
            raise QdiffError(f"{where}: layer spec version {version!r} is not supported (this qdiff reads {readable})")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k != SPEC_VERSION_KEY and k not in known]
        if unknown:
            raise QdiffError(f"{where}: unknown key {unknown[0]!r} in layer spec (known: {', '.join(known)})")
        missing = [k for k in known if k not in data]
        if version >= 2 and missing:
            raise QdiffError(f"{where}: layer spec version {version} lacks key {missing[0]!r}")
        try:
            return cls(**{k: v for k, v in data.items() if k != SPEC_VERSION_KEY})
        except (TypeError, ValueError) as exc:
            raise QdiffError(f"{where}: {exc}") from None
