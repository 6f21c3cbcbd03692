"""The permissions a plain ``open``/``mkdir`` would give: for outputs first written under a private temporary name.

``tempfile.mkstemp`` creates 0600 files and ``mkdtemp`` 0700 folders; an output renamed from them into place would
stay private to its writer (a shared model folder that a service account cannot read). :func:`give_usual_mode` sets
``0o666`` (files) or ``0o777`` (folders) less the process umask, as ``open`` and ``mkdir`` do.
"""

from __future__ import annotations

import os
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
