"""OpenVINO engine: a qdiff export as an OpenVINO pipeline folder (``export``) and its runtime (``runtime``).

Importing this package imports nothing heavy (no OpenVINO, no torch): ``qdiff.load``, ``qdiff generate`` and
``qdiff eval`` call :func:`is_openvino_folder` to recognise the folders.
"""

from __future__ import annotations

from pathlib import Path

OV_MANIFEST = "qdiff_openvino.json"  # the manifest file that marks an OpenVINO folder written by qdiff


def is_openvino_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder written by ``qdiff export-openvino`` (it holds :data:`OV_MANIFEST`)."""
    return (Path(path) / OV_MANIFEST).is_file()
