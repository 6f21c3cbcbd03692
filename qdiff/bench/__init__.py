"""Benchmarks behind ``qdiff bench kernels`` and ``qdiff bench pipeline`` (imported only by the CLI)."""
