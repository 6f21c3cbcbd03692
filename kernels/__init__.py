"""Triton device code, installed as ``qdiff._kernels``.

Imported lazily by ``qdiff.backends.triton`` only (on the first call that runs there), never at ``import qdiff``.
"""
