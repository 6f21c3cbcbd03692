"""The package layering (scripts/check_layers.py): no import, lazy ones included, goes sideways or upwards."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    return load_script("check_layers")


def test_qdiff_layering_holds():
    assert _checker().violations(ROOT / "qdiff") == []


def test_checker_catches_lazy_upward_and_sibling_imports(tmp_path):
    pkg = tmp_path / "qdiff"
    for unit in ("quant", "export", "numerics", "models"):
        (pkg / unit).mkdir(parents=True)
        (pkg / unit / "__init__.py").write_text("")
    (pkg / "quant" / "a.py").write_text("def f():\n    from qdiff.export.save import x  # lazy, upward\n")
    (pkg / "numerics" / "b.py").write_text("import qdiff.models.adapters\n")  # sibling
    (pkg / "export" / "c.py").write_text("from qdiff import quant\nfrom qdiff.numerics import b\n")  # both fine
    (pkg / "mystery.py").write_text("")
    found = _checker().violations(pkg)
    assert any("quant/a.py:2: quant imports export, a higher layer" in v for v in found), found
    assert any("numerics/b.py:1: numerics imports models, a sibling" in v for v in found), found
    assert any(v.startswith("mystery: not placed in LAYERS") for v in found), found
    assert not any("export/c.py" in v for v in found), found


def test_the_suite_has_one_conftest():
    """Test folders are not packages, so pytest imports every ``conftest.py`` as the module ``conftest``: a second
    one replaces the root's in ``sys.modules`` and every ``from conftest import ...`` collected after it fails (the
    CI run of aa726d8 stopped at collection this way; a local run of one folder does not show it)."""
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("conftest.py"))
    assert found == ["tests/conftest.py"]
