"""Progress reporting: live bars only on a terminal; one line per stage in logs, never a carriage return."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from qdiff.utils.progress import StageLine, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


LINE = re.compile(r"^stage: (\d+)/(\d+) batch in \d+\.\d s$")


def test_not_a_terminal_prints_one_line_per_stage_at_the_end():
    log = io.StringIO()
    bar = progress_bar(range(5), desc="stage", unit="batch", file=log)
    assert isinstance(bar, StageLine)
    seen = []
    for i in bar:
        seen.append(i)
        assert log.getvalue() == ""  # nothing while the stage runs
    assert seen == [0, 1, 2, 3, 4]
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]).groups() == ("5", "5"), lines
    assert "\r" not in log.getvalue()


def test_manual_updates_and_with_block_close_once():
    log = io.StringIO()
    with progress_bar(total=10, desc="stage", unit="batch", file=log) as bar:
        bar.update(3)
        bar.update()
        bar.close()  # an explicit close inside the block: still one line
    assert len(log.getvalue().splitlines()) == 1
    assert LINE.match(log.getvalue().strip()).groups() == ("4", "10")


def test_a_stage_left_early_still_reports_what_it_did():
    log = io.StringIO()
    bar = progress_bar([1, 2, 3], desc="stage", unit="batch", file=log)
    for i in bar:
        if i == 2:
            break
    bar.close()
    assert LINE.match(log.getvalue().strip()).groups() == ("1", "3")


def test_disabled_prints_nothing_anywhere():
    for stream in (io.StringIO(), _Terminal()):
        assert list(progress_bar(range(3), desc="stage", enabled=False, file=stream)) == [0, 1, 2]
        assert stream.getvalue() == ""


def test_a_terminal_gets_a_live_bar():
    from tqdm import tqdm

    term = _Terminal()
    bar = progress_bar(range(3), desc="stage", unit="batch", file=term)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    assert "stage" in term.getvalue()  # tqdm drew on it


def test_cli_log_has_no_carriage_returns(tmp_path):
    """``qdiff quantize`` then ``qdiff generate`` with stderr piped (as in CI): the packing stage is one line, and
    neither qdiff's bars nor diffusers' / transformers' own (component loading, weights, sampler steps) redraw."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "qdiff.cli"]
    export = str(tmp_path / "o")
    out = subprocess.run([*cli, "quantize", "--model", "builtin:tiny-sd", "--out", export], capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr + out.stdout
    assert re.search(r"^packing weights: (\d+)/\1 layer in \d+\.\d s$", out.stderr, re.M), out.stderr
    png = str(tmp_path / "c.png")
    gen = subprocess.run([*cli, "generate", export, "--prompt", "a cat", "--steps", "2", "--out", png],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "\r" not in gen.stderr + gen.stdout, gen.stderr[-2000:]
