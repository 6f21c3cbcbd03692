"""`import qdiff` must stay cheap: no Triton, no CUDA initialisation, no network."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_is_lazy_and_offline():
    code = textwrap.dedent(
        """
        import socket, sys
        def _no_network(*a, **k):
            raise RuntimeError("network access during import")
        socket.socket.connect = _no_network
        socket.create_connection = _no_network
        import qdiff
        assert "triton" not in sys.modules, "triton imported"
        assert "qdiff._kernels" not in sys.modules
        assert "diffusers" not in sys.modules, "diffusers imported eagerly"
        torch = sys.modules.get("torch")
        assert torch is None or not torch.cuda.is_initialized()
        # touching the public API must not pull Triton or CUDA either
        qdiff.Recipe, qdiff.quantize, qdiff.save, qdiff.load
        assert "triton" not in sys.modules, "triton imported by the API modules"
        import torch
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
