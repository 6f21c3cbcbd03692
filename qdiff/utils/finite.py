"""Non-finite values (NaN / Inf) in weights and activations: found early, reported with where they are.

A NaN weight or activation quantizes to a NaN scale and then travels into every image, so qdiff refuses it:
:func:`check_parameters` before quantizing or calibrating, :func:`check_tensor` (or :func:`check_range` when the
min / max of the tensor are already at hand) inside the observers and the calibration statistics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qdiff.errors import QdiffError


class NonFiniteError(QdiffError):
    """A tensor holds NaN or Inf values; the message says how many (``"3 NaN values"``)."""


def count_nonfinite(t: Tensor) -> tuple[int, int]:
    """(NaN count, +-Inf count) of a floating tensor (0, 0 for other dtypes)."""
    if not t.is_floating_point():
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def describe(nan: int, inf: int) -> str:
    """``"3 NaN values"``, ``"1 Inf value"``, ``"2 NaN and 1 Inf values"``."""
    parts = [f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n]
    return " and ".join(parts) + (" value" if nan + inf == 1 else " values")


def check_tensor(t: Tensor) -> None:
    """NonFiniteError (with the counts) when ``t`` holds a NaN or an Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(describe(*count_nonfinite(t)))


def check_range(t: Tensor, lo: float | Tensor, hi: float | Tensor) -> None:
    """Like :func:`check_tensor`, for free when ``lo`` / ``hi`` are ``t``'s min / max (they carry any NaN / Inf)."""
    finite = (
        bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())
        if isinstance(lo, Tensor) or isinstance(hi, Tensor)
        else math.isfinite(lo) and math.isfinite(hi)
    )
    if not finite:
        raise NonFiniteError(describe(*count_nonfinite(t)))


def check_parameters(module: nn.Module, what: str = "denoiser") -> None:
    """QdiffError naming the first floating parameter of ``module`` that holds NaN / Inf (and how many others do).

    ``"denoiser: weight of 'down_blocks.0.attentions.0.proj_in' has 3 NaN values"``. One fused pass per
    parameter (``isfinite().all()``); the counts are computed only for a bad one.
    """
    bad: list[str] = []
    for name, p in module.named_parameters():
        if p.is_meta or not p.is_floating_point() or bool(torch.isfinite(p.detach()).all()):
            continue
        owner, _, attr = name.rpartition(".")
        where = f"{attr} of {owner!r}" if owner else f"parameter {attr!r}"
        bad.append(f"{where} has {describe(*count_nonfinite(p.detach()))}")
    if bad:
        more = f" (and {len(bad) - 1} more non-finite parameter(s))" if len(bad) > 1 else ""
        raise QdiffError(f"{what}: {bad[0]}{more}; non-finite weights would reach every image, fix the checkpoint")
