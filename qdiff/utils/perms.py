"""The permissions a plain ``open``/``mkdir`` would give: for outputs first written under a private temporary name.

``tempfile.mkstemp`` creates 0600 files and ``mkdtemp`` 0700 folders; an output renamed from them into place would
stay private to its writer (a shared model folder that a service account cannot read). :func:`give_usual_mode` sets
``0o666`` (files) or ``0o777`` (folders) less the process umask, as ``open`` and ``mkdir`` do; :func:`usual_mkstemp`
creates such a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def process_umask() -> int:
    """The process umask, read from ``/proc/self/status`` where Linux offers it (no change to process state);
    elsewhere by setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_mode(path: str | Path, directory: bool) -> None:
    """chmod ``path`` to what ``mkdir`` (``directory``) or ``open`` would have created."""
    os.chmod(path, (0o777 if directory else 0o666) & ~process_umask())


def usual_mkstemp(folder: str | Path, prefix: str, suffix: str = "") -> Path:
    """A new empty temporary file in ``folder`` (``tempfile.mkstemp``, its descriptor closed) with the mode ``open``
    would give it; removed again if that fails. The caller writes it by name and renames it into place."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.close(fd)
        give_usual_mode(tmp, directory=False)  # mkstemp creates 0600
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)
