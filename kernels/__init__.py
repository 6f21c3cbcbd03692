"""Triton device code, installed as ``qdiff._kernels``.

Imported lazily by ``qdiff.backends.ops`` only, never at ``import qdiff``.
"""
