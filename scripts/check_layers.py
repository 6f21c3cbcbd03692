"""Check qdiff's layering: every import (lazy ones inside functions included) goes to the same unit or a lower layer.

A *unit* is a sub-package (``qdiff/quant/``) or a top-level module (``qdiff/api.py``). ``LAYERS`` lists them from the
bottom up; a unit may import units of lower layers only (never its own layer's siblings, never upwards), which also
rules out import cycles. Run ``python scripts/check_layers.py``: it prints the offending imports with file:line and
exits 1, or prints the layer table and exits 0. ``tests/test_layers.py`` runs it; ``docs/architecture.md`` draws it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

# bottom -> top; units on one line are siblings that must not import each other
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("config", "utils", "distributed"),  # Recipe, Plan, LayerQuant, bit-widths, dtypes; machine facts; torchrun
    ("numerics", "sampling", "models"),  # quantize math + packed weights; the seeded sampler; family registry
    ("_kernels",),  # Triton device code (kernels/, installed as qdiff._kernels)
    ("backends",),  # frozen-op implementations and their registry
    ("quant",),  # quantized modules, observers, transform
    ("sched", "lora"),  # Q-Sched scheduler wrapper, JAQ, scorers, search; LoRA layers beside frozen ones, LoRA fusing
    ("export",),  # every byte written or read: save, load, manifest, model resolution
    ("calib",),  # capture, sensitivity, allocation
    ("engines",),  # an export as another runtime's model (OpenVINO): export-openvino and its loader
    ("eval",),
    ("bench",),
    ("api",),
    ("integrations",),  # diffusers quantization backend (quant_method "qdiff"); may import the API
    ("cli_parser",),  # the argument parser (a layer below the commands that use it)
    ("cli", "__init__", "__main__"),
)


def _rank() -> dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit_of(path: Path, package: Path) -> str:
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(unit, line) for every ``qdiff.<unit>`` named by an absolute import anywhere in the module."""
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "qdiff" else [f"qdiff.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "qdiff" and len(parts) > 1:
                yield parts[1], node.lineno


def violations(package: Path) -> list[str]:
    """Human-readable offending imports (empty when the layering holds)."""
    rank = _rank()
    out: list[str] = []
    units_on_disk = {_unit_of(p, package) for p in package.rglob("*.py")}
    for unit in sorted(units_on_disk - set(rank)):
        out.append(f"{unit}: not placed in LAYERS (scripts/check_layers.py)")
    for path in sorted(package.rglob("*.py")):
        src = _unit_of(path, package)
        tree = ast.parse(path.read_text(), filename=str(path))
        for dst, line in _imported_units(tree):
            if dst == src or dst not in rank and dst not in units_on_disk:
                continue  # same unit, or an attribute such as qdiff.__version__
            if dst not in rank or src not in rank:
                continue  # reported above
            if rank[dst] >= rank[src]:
                what = "a sibling" if rank[dst] == rank[src] else "a higher layer"
                out.append(f"{path}:{line}: {src} imports {dst}, {what}")
    return out


def main() -> int:
    package = Path(__file__).resolve().parent.parent / "qdiff"
    found = violations(package)
    for line in found:
        print(line)
    if found:
        return 1
    for i, layer in reversed(list(enumerate(LAYERS))):
        print(f"{i:2d}  {', '.join(layer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
