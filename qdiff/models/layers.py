"""Layer records and name patterns: the vocabulary the family registry declares its rules in.

A denoiser's quantizable layers are its ``nn.Linear`` / ungrouped ``nn.Conv2d`` modules, listed in module
order as :class:`LayerInfo` records. Each belongs to a group:

* ``"content"`` — layers that mix in the text condition or carry most of the semantic content
  (cross-attention and feed-forward layers; MixDQ's "content-related" layers);
* ``"quality"`` — everything else (convolutions, self-attention, projections, embeddings).

Rules are dotted-name patterns (:func:`name_matches`): each dot-separated part is an ``fnmatch`` pattern for
one name part, and ``**`` stands for any number of parts (none included): ``**.attn2.to_k`` is every
``to_k`` directly under an ``attn2``; ``transformer_blocks.**.ff.**`` is everything inside a feed-forward of a
top-level transformer block.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

CONTENT = "content"
QUALITY = "quality"


@dataclass(frozen=True)
class LayerInfo:
    name: str  # qualified module name inside the denoiser
    kind: str  # "linear" | "conv2d"
    group: str  # "content" | "quality"
    protected: bool  # kept in full precision by default
    in_features: int  # K: Linear in_features; Conv2d in_channels * kh * kw / groups
    out_features: int  # N
    weight_numel: int
    a_split: int | None = None  # Conv2d on a concatenation: input channel where the skip part starts


def quantizable_modules(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every ``nn.Linear`` / ungrouped ``nn.Conv2d`` (subclasses included) as ``(name, module, kind)``.

    Modules are visited in ``named_modules`` order (registration order). Grouped / depthwise convolutions
    are skipped: they are not a plain GEMM.
    """
    found = []
    for name, mod in module.named_modules():
        if not name:
            continue
        if isinstance(mod, nn.Linear):
            found.append((name, mod, "linear"))
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
            found.append((name, mod, "conv2d"))
    return found


def gemm_shape(mod: nn.Module, kind: str) -> tuple[int, int]:
    """``(K, N)`` of the layer's GEMM: Linear ``(in, out)``; Conv2d ``(in_channels * kh * kw / groups, out)``."""
    if kind == "linear":
        return int(mod.in_features), int(mod.out_features)
    kh, kw = mod.kernel_size
    return int(mod.in_channels * kh * kw // mod.groups), int(mod.out_channels)


def _split(pattern: str) -> tuple[str, ...]:
    parts = tuple(pattern.split("."))
    if not pattern or any(not p for p in parts):
        raise ValueError(f"bad layer-name pattern {pattern!r}: empty part")
    return parts


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and _match(rest, parts[1:])


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether the dotted module ``name`` matches any of ``patterns`` (see the module docstring)."""
    parts = tuple(name.split("."))
    return any(_match(_split(p), parts) for p in patterns)


def check_patterns(patterns: tuple[str, ...], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` for a malformed pattern (empty part) or a non-tuple."""
    if not isinstance(patterns, tuple) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{where}: expected a tuple of name patterns, got {patterns!r}")
    for p in patterns:
        try:
            _split(p)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
