"""Bit-widths qdiff supports: the one place they are listed (recipes, layer specs, math and allocator read them)."""

from __future__ import annotations

WEIGHT_BITS: tuple[int, ...] = (2, 3, 4, 8)  # stored 4 per byte (2), 2 per byte (3, 4), 1 per byte (8)
ACT_BITS: tuple[int, ...] = (4, 8)  # quantized activations
FLOAT_ACT_BITS = 16  # how recipes and plans say "activations stay in floating point" (W*A16)
RECIPE_ACT_BITS: tuple[int, ...] = (*ACT_BITS, FLOAT_ACT_BITS)
