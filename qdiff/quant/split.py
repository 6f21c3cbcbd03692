"""Split activation quantizers for concatenated inputs (Q-Diffusion's shortcut splitting).

A UNet up-block resnet sees ``cat([up_path, skip], dim=1)``: channels ``[0, split)`` come from the up path,
``[split, C)`` from the down-path skip stack, and the two have very different ranges. Li et al. (Q-Diffusion,
ICCV 2023, Sec. 4.3) quantize them separately. Here a layer with ``LayerQuant.a_split`` holds one static
(scale, zero-point) per part; this module has the calibration-side pieces: the names of the per-part
statistics and an observer that keeps one range per part.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qdiff.quant.observers import Observer

PART_SUFFIXES = ("#up", "#skip")  # statistics keys: f"{layer}#up" (channels < split), f"{layer}#skip" (the rest)


def part_keys(name: str) -> tuple[str, str]:
    """Keys of a split layer's two per-part statistics, first part first."""
    return tuple(name + s for s in PART_SUFFIXES)  # type: ignore[return-value]


def split_parts(x: Tensor, split: int) -> tuple[Tensor, Tensor]:
    """``(x[:, :split], x[:, split:])`` of a (B, C, ...) tensor."""
    return x[:, :split], x[:, split:]


class SplitObserver(Observer):
    """One observer per channel part; ``qparams`` returns (2,) scales and zero-points (first part first)."""

    def __init__(self, parts: tuple[Observer, Observer], split: int) -> None:
        super().__init__()
        self.parts, self.split = parts, int(split)

    def update(self, x: Tensor) -> None:
        for obs, part in zip(self.parts, split_parts(x, self.split)):
            obs.update(part)
        self._num_updates += 1

    @property
    def initialized(self) -> bool:
        return all(obs.initialized for obs in self.parts)

    def range(self) -> tuple[Tensor, Tensor]:
        ranges = [obs.range() for obs in self.parts]
        return torch.stack([r[0].reshape(()) for r in ranges]), torch.stack([r[1].reshape(()) for r in ranges])

    def qparams(self, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        pairs = [obs.qparams(bits, symmetric) for obs in self.parts]  # each observer's own choice (e.g. MSE)
        return torch.stack([p[0].reshape(()) for p in pairs]), torch.stack([p[1].reshape(()) for p in pairs])

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self._num_updates, "parts": [obs.state_dict() for obs in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._num_updates = int(state["num_updates"])
        for obs, part in zip(self.parts, state["parts"], strict=True):
            obs.load_state_dict(part)

    def __repr__(self) -> str:
        return f"SplitObserver(split={self.split}, parts={list(self.parts)})"
