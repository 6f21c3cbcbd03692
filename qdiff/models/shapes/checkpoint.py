"""Training plumbing for the Shapes stages: atomic safetensors checkpoints (no pickle), logging, threads, EMA."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def setup(threads: int | None, seed: int) -> None:
    """Set torch threads (``None``/0 = all cores) and seed python, numpy and torch."""
    if threads:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1) if torch.get_num_interop_threads() != 1 else None
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Logger:
    """Print and append lines to ``<dir>/log.txt``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "log.txt"

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file + ``os.replace``)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def atomic_save_json(obj: Any, path: Path) -> None:
    """Write JSON atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> dict[str, torch.Tensor]:
    """Flatten an optimizer's per-parameter state into named tensors (for safetensors)."""
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "opt.") -> None:
    """Inverse of :func:`optimizer_tensors` (param groups / hyper-parameters come from the live optimizer)."""
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith(prefix):
            pid, k = name[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(
    path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer | None, meta: dict[str, Any]
) -> None:
    """One-file checkpoint: module states (``<name>.<param>``), optimizer state, and JSON ``meta``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        tensors.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    if opt is not None:
        tensors.update(optimizer_tensors(opt))
    atomic_save_tensors(tensors, path, metadata={"meta": json.dumps(meta)})


def checkpoint_step(path: Path) -> int:
    """The ``step`` recorded in a checkpoint's metadata (0 if there is no checkpoint)."""
    from safetensors import safe_open

    if not path.exists():
        return 0
    with safe_open(str(path), "pt") as f:
        return int(json.loads(f.metadata()["meta"]).get("step", 0))


def load_checkpoint(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its ``meta``."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    for name, m in modules.items():
        p = name + "."
        m.load_state_dict({k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)})
    if opt is not None:
        load_optimizer_tensors(opt, tensors)
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"])


def rng_state() -> dict[str, Any]:
    """Torch CPU RNG state as a JSON-able list (restored by :func:`set_rng_state`)."""
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class EMA:
    """Exponential moving average copy of a module (``.model``); decay warms up as (1+n)/(10+n)."""

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        import copy

        self.decay = decay
        self.model = copy.deepcopy(module).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for e, v in zip(self.model.state_dict().values(), module.state_dict().values()):
            if v.dtype.is_floating_point:
                e.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                e.copy_(v)
