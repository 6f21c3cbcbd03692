"""The one exception type users see: a clear, single-line message naming what was wrong."""


class QdiffError(Exception):
    """Bad input or an unavailable resource. The CLI prints it as one line and exits non-zero."""
