"""Static activation (scale, zero-point) of quantized layers from captured range statistics (``qdiff calibrate``).

One function for both quantize paths (in memory, ``qdiff.api``; streaming, ``qdiff.export.stream``), so a calibration
folder means the same ranges whichever path reads it. ``ranges`` is a :class:`qdiff.calib.stats.CapturedStats`
(``.layers``: name -> statistics with ``num_updates`` and ``qparams(observer, bits, symmetric, percentile)``;
``.meta``: ``bos_layers``, ``split_layers``); it is duck-typed here because calibration sits above this layer.
"""

from __future__ import annotations

from collections.abc import Mapping

from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.quant.modules import QuantLayer
from qdiff.quant.split import part_keys


def static_qparams(layers: Mapping[str, QuantLayer], recipe: Recipe, ranges) -> dict[str, tuple[list, list]]:
    """name -> ([scale per part], [zero-point per part]) for every static-activation layer of ``layers``.

    Errors name the layer before anything is changed: no statistics, statistics taken with another BOS-aware setting
    (a BOS-aware layer has ``bos_mode``), or a split layer without per-part statistics.
    """
    act = recipe.activations
    bos_layers = set(ranges.meta.get("bos_layers", ()))
    out = {}
    for name, layer in layers.items():
        if not layer.qcfg.static_act:
            continue
        stats = ranges.layers.get(name)
        if stats is None or stats.num_updates == 0:
            raise QdiffError(f"captured ranges have no statistics for layer {name!r}; run qdiff calibrate again")
        bos = name in bos_layers
        if bos != hasattr(layer, "bos_mode"):
            raise QdiffError(f"captured ranges for {name!r} were taken with bos_aware={bos}; the recipe differs")
        parts = [stats]
        if layer.qcfg.split_act:  # one range per part (Q-Diffusion shortcut splitting)
            if (ranges.meta.get("split_layers") or {}).get(name) != layer.qcfg.a_split:
                raise QdiffError(
                    f"captured ranges have no per-part statistics for split layer {name!r}; run qdiff calibrate "
                    "again (activations.split_skip: true) or set activations.split_skip: false"
                )
            parts = [ranges.layers[key] for key in part_keys(name)]
        qparams = [st.qparams(act.observer, layer.qcfg.a_bits, False, act.percentile) for st in parts]
        out[name] = ([q[0] for q in qparams], [q[1] for q in qparams])
    return out
