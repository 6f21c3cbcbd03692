"""Single-file checkpoints (``model.safetensors`` as published on model sites) -> a diffusers pipeline, offline.

A single file holds weights only; diffusers' ``from_single_file`` also needs the pipeline's configs. qdiff takes
them from a local diffusers folder (``--config FOLDER``: ``model_index.json`` plus each component's config, no
weights needed) or from a ``model_index.json`` beside the file, and never downloads one. Only ``.safetensors``
is accepted: ``.ckpt`` / ``.pt`` / ``.bin`` files are pickles and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from qdiff.errors import QdiffError

MODEL_INDEX = "model_index.json"


def config_folder(path: Path, config: str | Path | None) -> Path:
    """The folder with the pipeline configs for the single file ``path`` (``config`` or the file's folder)."""
    if config is not None:
        folder = Path(config).expanduser()
        if not (folder / MODEL_INDEX).is_file():
            raise QdiffError(f"--config {folder}: no {MODEL_INDEX} (need a diffusers folder with pipeline configs)")
        return folder
    if (path.parent / MODEL_INDEX).is_file():
        return path.parent
    raise QdiffError(
        f"single-file checkpoint '{path}' needs the pipeline configs: pass --config FOLDER (a diffusers folder of the "
        f"same architecture with {MODEL_INDEX} and the component configs; weights not needed) or put {MODEL_INDEX} "
        "and the component folders beside the file"
    )


def load_single_file(path: Path, config: str | Path | None = None, dtype_kwargs: dict | None = None):
    """Load a ``.safetensors`` single-file checkpoint with the pipeline class named in the config folder."""
    if path.suffix.lower() != ".safetensors":
        raise QdiffError(
            f"model file '{path}': only .safetensors single-file checkpoints are loaded (.ckpt/.pt/.bin are pickles "
            "and are refused); convert it to safetensors or pass a diffusers folder"
        )
    folder = config_folder(path, config)
    try:
        cls_name = json.loads((folder / MODEL_INDEX).read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QdiffError(f"{folder / MODEL_INDEX}: not a diffusers model index ({type(exc).__name__})") from None
    import diffusers

    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise QdiffError(f"{folder / MODEL_INDEX}: pipeline class {cls_name!r} cannot load single-file checkpoints")
    try:
        pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **(dtype_kwargs or {}))
    except Exception as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise QdiffError(f"could not load single-file checkpoint '{path}' as {cls_name} with configs from {folder}: "
                         f"{text}") from exc  # fmt: skip
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
