"""Per-component float precision: defaults, one value for all, and a mapping that overrides only what it names."""

from __future__ import annotations

import pytest

from qdiff.engines.openvino.precision import DEFAULTS, parse_precision, resolve_precisions
from qdiff.errors import QdiffError

PARTS = ["unet", "text_encoder", "vae_decoder"]


def test_defaults_one_value_and_mapping():
    assert resolve_precisions(None, PARTS) == {p: DEFAULTS[p] for p in PARTS}
    assert resolve_precisions("f32", PARTS) == dict.fromkeys(PARTS, "f32")
    assert resolve_precisions({"unet": "f32"}, PARTS) == {**{p: DEFAULTS[p] for p in PARTS}, "unet": "f32"}
    with pytest.raises(QdiffError, match="no component 'vae_encoder'"):
        resolve_precisions({"vae_encoder": "f32"}, PARTS)


def test_a_mapping_overrides_a_loaded_folders_recorded_precisions_only_where_it_names():
    recorded = {"unet": "f32", "text_encoder": "f32", "vae_decoder": "bf16"}  # not the defaults
    assert resolve_precisions(None, PARTS, base=recorded) == recorded
    assert resolve_precisions(parse_precision("unet=bf16"), PARTS, base=recorded) == {**recorded, "unet": "bf16"}
