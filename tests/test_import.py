"""`import qdiff` must stay cheap: no Triton, no CUDA initialisation, no network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


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
        import qdiff.api, qdiff.lora
        assert "peft" not in sys.modules, "peft imported before a LoRA is loaded"
        import torch
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


ROOT = Path(__file__).resolve().parents[1]


def test_repository_root_shadows_no_installed_package():
    """Python started at the repository root (``python -m pytest``, ``python -c``, a notebook: the root is
    ``sys.path[0]``) must import diffusers' pipelines and a transformers text model. The top-level ``kernels/`` folder
    is a plain folder (no ``__init__.py``), so Hugging Face's ``kernels`` package (transformers imports it) wins over
    it; with an ``__init__.py`` back, ``kernels`` resolves to the folder and this test fails even where Hugging
    Face's package is not installed."""
    code = textwrap.dedent(
        f"""
        import importlib.util, os
        root = {str(ROOT)!r}
        spec = importlib.util.find_spec("kernels")
        origin = spec.origin if spec is not None else None
        folder = os.path.join(root, "kernels")
        assert os.path.dirname(origin or "") != folder, f"'kernels' resolves to the repository's folder: {{origin}}"
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from transformers import CLIPTextConfig, CLIPTextModel
        model = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=16, max_position_embeddings=8))
        import qdiff._kernels.tiles as tiles  # the editable install maps the folder as qdiff._kernels
        import qdiff
        if qdiff.__file__.startswith(root + os.sep):
            assert tiles.__file__ == os.path.join(root, "kernels", "tiles.py"), tiles.__file__
        print("ok", origin)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok"), out.stdout
