"""Saving a quantized pipeline that holds unfused LoRAs: the export without them, the adapters beside it.

``qdiff.save`` / ``pipe.save_pretrained`` write the export from the pipeline with every LoRA layer swapped back to
its base layer for the duration (:func:`detached_loras`): the denoiser's tensors, layer table and every other
component are exactly those of the pipeline before ``load_lora_weights``. Each adapter is written in diffusers' LoRA
format (``save_lora_weights`` of the pipeline class: ``<component>.<module>.lora_A.weight`` keys and the adapter
metadata in the header) as ``lora/adapter-<i>.safetensors``, hashed in the manifest like every file, and the manifest's
``lora_adapters`` records each adapter's name and ``set_adapters`` weight per component, the active adapters and
whether LoRAs were enabled. Loading the export (any loader) gives the pipeline *without* the adapters; ``qdiff.lora.
load_saved_loras(pipe, folder)`` loads them back through ``pipe.load_lora_weights`` and restores the weights, giving
the images of the saved pipeline bit for bit (tests/lora/test_lora_shapes.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qdiff.errors import QdiffError
from qdiff.utils.hashing import sha256_file

LORA_FOLDER = "lora"
MANIFEST = "qdiff.json"  # the export's manifest (qdiff.export.manifest.MANIFEST; lora sits below export)
_FILE = re.compile(rf"{LORA_FOLDER}/adapter-[0-9]+\.safetensors")
_PEFT_ATTRS = ("peft_config", "_hf_peft_config_loaded")  # what diffusers / transformers keep on a model with LoRAs


@dataclass
class SavedAdapters:
    """The adapters of a pipeline (state dicts per component) and how they were set."""

    pipeline_class: type
    states: dict[str, dict[str, dict]] = field(default_factory=dict)  # adapter -> component -> PEFT state dict
    metadata: dict[str, dict[str, dict]] = field(default_factory=dict)  # adapter -> component -> LoraConfig dict
    weights: dict[str, dict[str, float]] = field(default_factory=dict)  # adapter -> component -> set_adapters weight
    active: list[str] = field(default_factory=list)
    enabled: bool = True

    def write(self, folder: Path) -> dict[str, Any]:
        """Write ``folder/lora/adapter-<i>.safetensors``; returns the manifest's ``lora_adapters`` entry."""
        entries = []
        for i, (name, states) in enumerate(self.states.items()):
            file = f"adapter-{i}.safetensors"
            kwargs = {f"{c}_lora_layers": sd for c, sd in states.items()}
            kwargs |= {f"{c}_lora_adapter_metadata": meta for c, meta in self.metadata[name].items()}
            self.pipeline_class.save_lora_weights(folder / LORA_FOLDER, weight_name=file, **kwargs)
            entries.append({"name": name, "file": f"{LORA_FOLDER}/{file}", "weights": self.weights[name]})
        return {"adapters": entries, "active": self.active, "enabled": self.enabled}


def _lora_layers(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, LoRA layer) of every PEFT LoRA layer in ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    for parent in module.modules():
        for attr, child in parent.named_children():
            if isinstance(child, BaseTunerLayer) and hasattr(child, "base_layer"):
                found.append((parent, attr, child))
    return found


def _weight(layers: list[nn.Module], adapter: str, where: str) -> float:
    """The ``set_adapters`` weight ``w`` of ``adapter``: PEFT sets ``scaling = w * lora_alpha / r`` in every layer, and
    the ``w`` found here gives back each layer's scaling bit for bit (else the images would not be the same)."""
    have = [m for m in layers if adapter in m.scaling]
    first = have[0]
    guess = first.scaling[adapter] * _rank(first, adapter) / first.lora_alpha[adapter]
    for w in (guess, math.nextafter(guess, math.inf), math.nextafter(guess, -math.inf)):
        if all(w * m.lora_alpha[adapter] / _rank(m, adapter) == m.scaling[adapter] for m in have):
            return w
    raise QdiffError(
        f"{where}: adapter {adapter!r} has per-block set_adapters weights; qdiff saves one weight per "
        "component: set one weight per component before saving, or fuse the LoRA before quantizing"
    )


def _rank(layer: nn.Module, adapter: str) -> float:
    return math.sqrt(layer.r[adapter]) if layer.use_rslora.get(adapter) else layer.r[adapter]


@contextlib.contextmanager
def detached_loras(pipe) -> Iterator[SavedAdapters | None]:
    """Every LoRA layer of ``pipe`` replaced by its base layer (and the PEFT attributes set aside) while active; yields
    the adapters, or None when there are none. Everything is put back on exit, error or not."""
    if "peft" not in sys.modules:  # no LoRA can have been loaded
        yield None
        return
    from peft.utils import get_peft_model_state_dict

    # each component walked once: component -> (module, its (parent, attribute, LoRA layer) triples)
    found = {n: (c, hit) for n, c in pipe.components.items() if isinstance(c, nn.Module) and (hit := _lora_layers(c))}
    if not found:
        yield None
        return
    components = {n: c for n, (c, _) in found.items()}
    saved = SavedAdapters(type(pipe))
    for comp, (module, hit) in found.items():
        layers = [layer for _, _, layer in hit]
        saved.active = list(dict.fromkeys(saved.active + list(layers[0].active_adapters)))
        saved.enabled = saved.enabled and not layers[0].disable_adapters
        for name, config in getattr(module, "peft_config", {}).items():
            if name in layers[0].merged_adapters:
                raise QdiffError(f"{comp}: adapter {name!r} is fused; unfuse it (pipe.unfuse_lora()) before saving")
            saved.states.setdefault(name, {})[comp] = get_peft_model_state_dict(module, adapter_name=name)
            saved.metadata.setdefault(name, {})[comp] = config.to_dict()
            saved.weights.setdefault(name, {})[comp] = _weight(layers, name, comp)
    swaps = [swap for _, hit in found.values() for swap in hit]
    stash = {
        (comp, attr): vars(m).pop(attr) for comp, m in components.items() for attr in _PEFT_ATTRS if attr in vars(m)
    }
    try:
        for parent, attr, layer in swaps:
            setattr(parent, attr, layer.get_base_layer())
        yield saved
    finally:
        for parent, attr, layer in swaps:
            setattr(parent, attr, layer)
        for (comp, attr), value in stash.items():
            setattr(components[comp], attr, value)


def saved_entry(folder: Path) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The ``lora_adapters`` entry of the export at ``folder`` (None: no adapters saved) and the manifest's file
    hashes. Called on an export that ``qdiff.load`` has already read and checked (its manifest included)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return manifest.get("lora_adapters") or None, manifest["files"]


def load_saved_loras(pipe, folder: str | Path) -> list[str]:
    """Load the adapters saved with the export at ``folder`` into ``pipe`` (loaded from it) with their names,
    ``set_adapters`` weights, active set and enabled state; returns the adapter names (an empty list: none saved)."""
    folder = Path(folder)
    entry, files = saved_entry(folder)
    if entry is None:
        return []
    for adapter in entry["adapters"]:
        if not isinstance(adapter.get("file"), str) or not _FILE.fullmatch(adapter["file"]):
            raise QdiffError(f"{folder / MANIFEST}: lora_adapters: unexpected file {adapter.get('file')!r}")
        path = folder / adapter["file"]
        if files.get(adapter["file"]) != sha256_file(path):
            raise QdiffError(f"{path}: sha256 mismatch with {MANIFEST} (file was modified or corrupted)")
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter["name"],
                               use_safetensors=True, local_files_only=True)  # fmt: skip
    weights = {a["name"]: a["weights"] for a in entry["adapters"]}
    pipe.set_adapters(entry["active"], adapter_weights=[weights[name] for name in entry["active"]])
    if not entry["enabled"]:
        pipe.disable_lora()
    return list(weights)
