"""The Shapes pipeline loader: offline, safetensors only, one clear line when the weights are absent."""

from __future__ import annotations

import pytest

from qdiff.errors import QdiffError
from qdiff.export.resolve import available_builtins
from qdiff.models.shapes.pipeline import bundled, shapes_pipeline


def test_builtin_is_registered():
    assert "shapes" in available_builtins()


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(QdiffError, match=r"no Shapes weights in .*python -m qdiff.models.shapes.train"):
        shapes_pipeline(weights_dir=tmp_path)


def test_bundled_pipeline_generates():
    assert bundled()
    pipe = shapes_pipeline()
    image = pipe("a large red circle on the left", num_inference_steps=2, guidance_scale=3.0).images[0]
    assert image.size == (64, 64)
