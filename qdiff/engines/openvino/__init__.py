"""OpenVINO engine: a qdiff export as an OpenVINO pipeline folder (``export``) and its runtime (``runtime``).

Importing this package imports nothing heavy (no OpenVINO, no torch): ``qdiff.export.resolve`` reads
:data:`OV_MANIFEST` to recognise the folders.
"""

OV_MANIFEST = "qdiff_openvino.json"  # the manifest file that marks an OpenVINO folder written by qdiff
