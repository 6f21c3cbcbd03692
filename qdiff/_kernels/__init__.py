"""``qdiff._kernels`` in a source checkout (editable install): the Triton device code of the top-level ``kernels/``.

``kernels/`` has no ``__init__.py`` on purpose: a regular package there would shadow Hugging Face's ``kernels``
(which transformers imports) for any Python started at the repository root. A built wheel carries the kernel files
in ``qdiff/_kernels/`` itself (pyproject's package-dir mapping) and does not include this file; setuptools' editable
finder cannot resolve a namespace package nested in a regular one, hence this two-line bridge.
"""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))  # noqa: F821 (the package's own __path__)
