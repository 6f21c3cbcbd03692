"""Per-layer quantization settings: what one quantized Linear/Conv2d does, as a frozen value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qdiff.config.bits import ACT_BITS, WEIGHT_BITS


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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerQuant:
        return cls(**data)  # keys added later (a_split) default when absent: older exports still load
