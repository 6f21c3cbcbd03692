"""LoRAs and qdiff: runtime adapters beside frozen integer layers, and LoRAs fused before quantizing (docs/lora.md).

* :mod:`qdiff.lora.layers` — ``QuantLoraLinear`` / ``QuantLoraConv2d``: PEFT LoRA layers beside a frozen layer;
* :mod:`qdiff.lora.inject` — the hook that lets diffusers' ``load_lora_weights`` build them (PEFT custom modules);
* :mod:`qdiff.lora.saved` — an export of a pipeline with unfused LoRAs: the adapters saved beside it, loaded back by
  :func:`load_saved_loras`;
* :mod:`qdiff.lora.fuse` / :mod:`qdiff.lora.stream` — ``--lora PATH[:SCALE]``: fused into the float weights before
  calibrating (in memory through diffusers, or layer by layer while streaming);
* :mod:`qdiff.lora.files` — safetensors-only LoRA files, their sha256.

Importing this package does not import PEFT; loading or fusing a LoRA does (``pip install 'qdiff[lora]'``).
"""

from __future__ import annotations

from qdiff.lora.pipeline import attach_pipeline_hooks
from qdiff.lora.saved import load_saved_loras

__all__ = ["attach_pipeline_hooks", "load_saved_loras"]
