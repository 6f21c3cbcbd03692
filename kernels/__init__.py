"""Triton device code, installed as ``qdiff._kernels``.

Imported lazily by ``qdiff.ops`` only, never at ``import qdiff``.
"""
