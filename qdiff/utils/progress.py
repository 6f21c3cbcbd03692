"""Progress of long work: a live bar on a terminal, one summary line per stage everywhere else.

A tqdm bar redraws itself with carriage returns; when stderr is not a terminal (CI, ``nohup``, a pipe, a log file)
every redraw stays in the log as part of one ever longer line. :func:`progress_bar` therefore returns a tqdm bar only
when its stream is a terminal, and otherwise a :class:`StageLine`, which prints nothing while the stage runs and one
line when it ends: ``{desc}: {done}/{total} {unit} in {seconds} s``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


class StageLine:
    """The part of tqdm's interface qdiff uses (iterate, ``update``, ``close``, ``with``), printing one line at the
    end of the stage (on ``close``, at the end of iteration, or when the ``with`` block exits) and none before."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, file: TextIO) -> None:
        self.iterable, self.desc, self.unit, self.file = iterable, desc, unit, file
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.n = 0
        self._start = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.n += 1
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        print(f"{self.desc}: {count} {self.unit} in {time.perf_counter() - self._start:.1f} s", file=self.file)

    def __enter__(self) -> StageLine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def is_terminal(file: TextIO) -> bool:
    """Whether ``file`` is an interactive terminal (False for pipes, files and closed or odd streams)."""
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    file: TextIO | None = None,
):
    """A progress reporter over ``iterable`` (or updated by hand with ``total``): tqdm on a terminal, a
    :class:`StageLine` elsewhere, silent (tqdm disabled) when ``enabled`` is False. ``file`` defaults to stderr."""
    from tqdm.auto import tqdm

    stream = sys.stderr if file is None else file
    if enabled and not is_terminal(stream):
        return StageLine(iterable, desc, total, unit, stream)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=not enabled, file=stream)


def quiet_library_bars() -> None:
    """Turn off the bars diffusers, transformers and huggingface_hub draw themselves ("Loading pipeline components",
    "Loading weights", downloads) for the rest of the process: for CLI runs whose stderr is not a terminal."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
