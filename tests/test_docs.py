"""Docs that match the code: every repository path, module, recipe name and ``qdiff`` command named in README.md
and docs/ exists.

Extraction rules, deliberately conservative (a false alarm teaches people to ignore the test):

* Only code counts: inline code spans (on one line) and fenced code blocks of ``README.md`` and ``docs/**/*.md``.
  Prose is never parsed ("qdiff never downloads" is not a command).
* Paths: a word of code that starts with one of the repository's top-level folders (:data:`REPO_DIRS`) or is one
  of its top-level files, unless it follows ``--out`` / ``>`` (an output the command writes). Trailing punctuation
  is stripped; ``path::name`` (a pytest node) also needs ``name`` defined in the file; a ``*`` glob must match
  something. Words with a placeholder (``<family>``, ``{...}``, ``$VAR``, ``...``, ``NAME``, ``OUT``) are skipped,
  and so is everything else: ``out/x`` output folders, ``builtin:`` specs, ``unet/``.
  Relative Markdown links ``[text](target)`` must exist too (resolved from the page's folder).
* Modules: a code token ``qdiff.a.b`` (not a file name such as ``qdiff.json``) must be a module of the package, or
  a module followed by a name defined at its top level (``qdiff.calibrate``: in ``__all__``).
* Recipes: ``--recipe NAME`` in code (not a path: no ``/``, not ``*.yaml``), and the backticked names of the first
  column of README's "Recipes" table and of every table column headed "recipes" load with ``Recipe.load``. A name
  starting with ``-`` continues the one before it in the cell (``lcm-dreamshaper-w8a8``, ``-w4a8``); ``*`` is a glob
  over the bundled recipes; names with a ``:`` (``builtin:shapes``) or a placeholder are not recipe names.
* Commands: ``qdiff SUB`` where a command starts in code (line start, after ``$``, ``&&``, ``;``, ``|``): ``SUB``
  (and ``bench``'s ``kernels`` / ``pipeline``) must be a sub-command whose ``--help`` exits 0, and every ``--flag``
  written after it (up to the end of that command) must be one of its options. One subprocess asks the parser.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
REPO_DIRS = ("qdiff", "tests", "docs", "scripts", "recipes", "kernels", "calibration_prompts", ".ci", ".github")
REPO_FILES = ("README.md", "pyproject.toml", ".gitignore")
PACKAGE_DIRS = {
    "qdiff._kernels": "kernels",
    "qdiff.recipes": "recipes",
    "qdiff.calibration_prompts": "calibration_prompts",
}
FILE_SUFFIXES = {"json", "safetensors", "yaml", "yml", "txt", "png", "md", "py", "toml", "csv", "log", "jsonl"}
# <family>, {a,b}, $VAR, ..., and the upper-case words the docs use for "fill in": backends/NAME.py, OUT/report.md
PLACEHOLDER = re.compile(r"[<>{}$]|\.\.\.|(?<![A-Za-z])(NAME|OUT|DIR|FOLDER|PATH|FILE|EXPORT|MODEL|SPEC)(?![A-Za-z])")
SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"(?<![\w/.-])qdiff(?:\.[A-Za-z_]\w*)+(?![\w/-])")
OUTPUT_FLAGS = {"--out", "-o", ">", ">>", "--log"}  # what follows is written by the command, not referenced
SEPARATORS = re.compile(r"&&|\|\||;|\|")


@dataclass(frozen=True)
class Code:
    """One piece of code on a page: an inline span or a (continuation-joined) line of a fenced block."""

    page: Path
    line: int
    text: str
    block: bool

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@cache
def code_pieces() -> tuple[Code, ...]:
    out: list[Code] = []
    for page in PAGES:
        fence, pending, start = None, "", 0
        for no, line in enumerate(page.read_text().splitlines(), 1):
            stripped = line.strip()
            if fence is None and stripped.startswith(("```", "~~~")):
                fence = stripped[:3]
                continue
            if fence is not None:
                if stripped.startswith(fence):
                    fence = None
                    continue
                pending, start = (pending + " " + stripped, start) if pending else (stripped, no)
                if pending.endswith("\\"):
                    pending = pending[:-1]
                    continue
                out.append(Code(page, start, pending, True))
                pending = ""
                continue
            out += [Code(page, no, m.group(2).strip(), False) for m in SPAN.finditer(line)]
    return tuple(out)


# ---- paths ----------------------------------------------------------------------------------------------------------
def _path_problem(token: str) -> str | None:
    """None when the repository path exists, else why not."""
    path, _, node = token.partition("::")
    if "*" in path:
        return None if any(ROOT.glob(path)) else "no file matches this glob"
    target = ROOT / path
    if not target.exists():
        return "does not exist"
    if node:
        name = node.split("::")[-1].split("[")[0]
        if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", target.read_text(), re.M):
            return f"{name!r} is not defined in {path}"
    return None


def _is_repo_path(token: str) -> bool:
    first = token.split("/", 1)[0]
    return (first in REPO_DIRS and "/" in token) or token in REPO_FILES


def path_references() -> list[tuple[str, str]]:
    refs = []
    for code in code_pieces():
        words = code.text.split()
        for before, raw in zip(["", *words], words):
            token = raw.strip("`'\"()[],;:").rstrip(".")
            if before in OUTPUT_FLAGS or PLACEHOLDER.search(token) or not _is_repo_path(token):
                continue
            refs.append((code.where(), token))
    return refs


def link_references() -> list[tuple[str, Path]]:
    refs = []
    for page in PAGES:
        fence = False
        for no, line in enumerate(page.read_text().splitlines(), 1):
            if line.strip().startswith(("```", "~~~")):
                fence = not fence
            if fence:
                continue
            for target in LINK.findall(SPAN.sub("", line)):
                target = target.split("#", 1)[0]
                if target and not re.match(r"^[a-z]+:", target):
                    refs.append((f"{page.relative_to(ROOT)}:{no}", page.parent / target))
    return refs


def test_paths_named_in_docs_exist():
    refs = path_references()
    assert len(refs) > 20, "the extraction found almost no paths: the rules no longer match the docs"
    bad = [f"{where}: `{token}` {why}" for where, token in refs if (why := _path_problem(token))]
    bad += [f"{where}: link {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target} does not exist"
            for where, target in link_references() if not target.exists()]  # fmt: skip
    assert not bad, "stale references:\n" + "\n".join(bad)


# ---- modules --------------------------------------------------------------------------------------------------------
def _top_level_names(source: Path) -> set[str]:
    names: set[str] = set()
    if not source.is_file():  # a package without __init__.py (the mapped kernels/ folder)
        return names
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                if isinstance(target, ast.Name) and target.id == "__all__" and node.value is not None:
                    names |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _module_problem(dotted: str) -> str | None:
    parts = dotted.split(".")
    folder = ROOT / "qdiff"
    for i in range(1, len(parts)):
        name = ".".join(parts[: i + 1])
        sub = ROOT / PACKAGE_DIRS[name] if name in PACKAGE_DIRS else folder / parts[i]
        if (sub / "__init__.py").is_file() or (name in PACKAGE_DIRS and sub.is_dir()):  # kernels/: no __init__.py
            folder = sub
            continue
        if sub.with_suffix(".py").is_file():
            rest = parts[i + 1 :]
            ok = not rest or rest[0] in _top_level_names(sub.with_suffix(".py"))
            return None if ok else f"{rest[0]!r} is not defined in {sub.with_suffix('.py').relative_to(ROOT)}"
        if parts[i] in _top_level_names(folder / "__init__.py"):
            return None
        return f"no module or name {parts[i]!r} in {'.'.join(parts[:i])}"
    return None


def module_references() -> list[tuple[str, str]]:
    found = [(c.where(), m) for c in code_pieces() for m in MODULE.findall(c.text)]
    return [(w, m) for w, m in found if m.rsplit(".", 1)[1] not in FILE_SUFFIXES and not PLACEHOLDER.search(m)]


def test_modules_named_in_docs_exist():
    refs = module_references()
    assert len(refs) > 5, "the extraction found almost no module names"
    bad = [f"{where}: `{dotted}` {why}" for where, dotted in refs if (why := _module_problem(dotted))]
    assert not bad, "stale module references:\n" + "\n".join(bad)


# ---- recipes --------------------------------------------------------------------------------------------------------
RECIPE_NAME = re.compile(r"^-?[a-z0-9][a-z0-9.*-]*$")


def _table_recipe_cells() -> list[tuple[str, str]]:
    """(where, cell) for README's Recipes table (first column) and every column headed ``recipes``."""
    cells = []
    for page in PAGES:
        section, header = "", None
        for no, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("#"):
                section, header = line.lstrip("#").strip().lower(), None
                continue
            if not line.startswith("|"):
                header = None
                continue
            row = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = [c.lower() for c in row]
                continue
            if set("".join(row)) <= set("-: "):
                continue
            columns = [i for i, h in enumerate(header) if h == "recipes"]
            if page.name == "README.md" and section == "recipes":
                columns.append(0)
            cells += [(f"{page.relative_to(ROOT)}:{no}", row[i]) for i in columns if i < len(row)]
    return cells


def recipe_references() -> list[tuple[str, str]]:
    refs = []
    for where, cell in _table_recipe_cells():
        previous = None
        for name in re.findall(r"`([^`]+)`", cell):
            if not RECIPE_NAME.match(name):
                continue
            if name.startswith("-"):
                if previous is None:
                    continue
                name = previous.rsplit("-", 1)[0] + name
            refs.append((where, name))
            previous = name
    for code in code_pieces():
        for name in re.findall(r"--recipe[ =](\S+)", code.text):
            name = name.strip("`'\"),;")
            if RECIPE_NAME.match(name) and "/" not in name and not name.endswith((".yaml", ".yml")):
                refs.append((code.where(), name))
    return refs


def test_recipe_names_in_docs_load():
    from qdiff.config.recipe import Recipe, bundled_recipes
    from qdiff.errors import QdiffError

    refs = recipe_references()
    assert len(refs) > 10, "the extraction found almost no recipe names"
    bundled, bad = bundled_recipes(), []
    for where, name in refs:
        if "*" in name:
            if not fnmatch.filter(bundled, name):
                bad.append(f"{where}: no bundled recipe matches `{name}`")
            continue
        try:
            Recipe.load(name)
        except QdiffError as exc:
            bad.append(f"{where}: `{name}`: {exc}")
    assert not bad, "recipe names that do not load:\n" + "\n".join(bad)


# ---- commands -------------------------------------------------------------------------------------------------------
def command_references() -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(where, sub-command path such as ("bench", "kernels"), flags used)."""
    refs = []
    for code in code_pieces():
        text = re.sub(r"(^|\s)#.*$", "", code.text) if code.block else code.text
        for segment in SEPARATORS.split(text):
            words = segment.split()
            if words[:1] == ["$"]:
                words = words[1:]
            if len(words) < 2 or words[0] != "qdiff" or not re.fullmatch(r"[a-z][a-z-]*", words[1]):
                continue
            sub = (words[1],)
            if words[1] == "bench" and len(words) > 2 and re.fullmatch(r"[a-z]+", words[2]):
                sub += (words[2],)
            flags = tuple(f.strip("[]()").split("=")[0] for f in words[2:] if f.strip("[(").startswith("--"))
            refs.append((code.where(), sub, flags))
    return refs


_PARSER_REPORT = """
import contextlib, io, json, sys
from qdiff.cli import build_parser
out = {}
for sub in json.loads(sys.argv[1]):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(sub + ["--help"])
        rc = 0
    except SystemExit as exc:
        rc = exc.code
    parser = build_parser()
    for name in sub:  # walk down to the sub-command's own parser
        action = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
        parser = action.choices.get(name) if action else None
        if parser is None:
            break
    options = sorted(o for a in parser._actions for o in a.option_strings) if parser is not None else []
    out[" ".join(sub)] = {"rc": rc, "help": buf.getvalue()[:80], "options": options}
print(json.dumps(out))
"""


def test_commands_in_docs_run_help_and_know_their_flags():
    refs = command_references()
    assert len(refs) > 10, "the extraction found almost no commands"
    subs = sorted({sub for _, sub, _ in refs})
    done = subprocess.run([sys.executable, "-c", _PARSER_REPORT, json.dumps([list(s) for s in subs])],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    bad = []
    for where, sub, flags in refs:
        entry = report[" ".join(sub)]
        if entry["rc"] != 0 or not entry["help"].startswith("usage:"):
            bad.append(f"{where}: `qdiff {' '.join(sub)} --help` exits {entry['rc']}")
            continue
        bad += [
            f"{where}: `qdiff {' '.join(sub)}` has no option {flag}" for flag in flags if flag not in entry["options"]
        ]
    assert not bad, "commands in the docs that the CLI does not accept:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("qdiff quantize --recipe w8a8 --out out/x", [(("quantize",), ("--recipe", "--out"))]),
        ("$ qdiff bench kernels --device cuda && qdiff eval a --out b", [(("bench", "kernels"), ("--device",)),
                                                                          (("eval",), ("--out",))]),
        ("qdiff fit-schedule X [--out out/y]  # see docs", [(("fit-schedule",), ("--out",))]),
        ("qdiff never downloads", [(("never",), ())]),  # in code it would count: prose is never parsed
        ("pip install qdiff[bnb]", []),
    ],
)  # fmt: skip
def test_command_extraction_rules(text, expected, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "code_pieces", lambda: (Code(ROOT / "README.md", 1, text, True),))
    assert [(sub, flags) for _, sub, flags in command_references()] == expected


def test_path_and_module_extraction_rules(monkeypatch):
    pieces = tuple(Code(ROOT / "README.md", 1, t, False) for t in (
        "qdiff/cli.py", "out/shapes-w8a8", "builtin:shapes", "recipes/*.yaml", "recipes/<family>-w8a8.yaml",
        "qdiff.json", "unet/qdiff.safetensors", "qdiff.api.quantize", "tests/test_cli.py::test_inspect_not_an_export",
        "qdiff/backends/NAME.py", "qdiff.backends.NAME", "qdiff bench kernels --out docs/new-table.md",
    ))  # fmt: skip
    monkeypatch.setattr(sys.modules[__name__], "code_pieces", lambda: pieces)
    assert [t for _, t in path_references()] == [
        "qdiff/cli.py", "recipes/*.yaml", "tests/test_cli.py::test_inspect_not_an_export"
    ]  # fmt: skip
    assert [m for _, m in module_references()] == ["qdiff.api.quantize"]
    assert _path_problem("tests/test_cli.py::no_such_test") == "'no_such_test' is not defined in tests/test_cli.py"
    assert _module_problem("qdiff.api.no_such_verb") == "'no_such_verb' is not defined in qdiff/api.py"
    assert _module_problem("qdiff.calibrate") is None and _module_problem("qdiff._kernels") is None
