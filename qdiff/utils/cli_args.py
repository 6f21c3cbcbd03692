"""``argparse`` types for numeric command-line options, checked while the command line is parsed.

Text that is not a number is argparse's usual usage error (exit 2, "invalid integer value"); a number out of
range raises :class:`~qdiff.errors.QdiffError` naming the option, which the CLI prints as one
``qdiff: error:`` line with exit status 1, like every other bad input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from qdiff.errors import QdiffError

SIZE_MULTIPLE = 8  # image sizes: the VAE downsamples by 8 in every supported pipeline


def positive_int(flag: str) -> Callable[[str], int]:
    """An integer >= 1 (steps, prompts, batch sizes, repetitions)."""

    def parse(text: str) -> int:
        value = int(text)
        if value <= 0:
            raise QdiffError(f"{flag} must be a positive integer, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own message: "invalid integer value: 'x'"
    return parse


def image_size(flag: str) -> Callable[[str], int]:
    """A positive multiple of 8 (height / width in pixels)."""

    def parse(text: str) -> int:
        value = int(text)
        if value <= 0 or value % SIZE_MULTIPLE:
            raise QdiffError(f"{flag} must be a positive multiple of {SIZE_MULTIPLE} pixels, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def seed(flag: str) -> Callable[[str], int]:
    """An integer in [0, 2**62): ``torch.Generator.manual_seed`` takes it, with room for ``seed + i`` per prompt."""

    def parse(text: str) -> int:
        value = int(text)
        if not 0 <= value < 2**62:
            raise QdiffError(f"{flag} must be an integer in [0, 2**62), got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def non_negative_float(flag: str) -> Callable[[str], float]:
    """A finite number >= 0 (guidance scale)."""

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise QdiffError(f"{flag} must be a finite number >= 0, got {text}")
        return value

    parse.__name__ = "number"
    return parse
