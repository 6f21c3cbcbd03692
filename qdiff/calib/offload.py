"""Bounded-memory calibration: the denoiser's blocks live off the device and are materialised one at a time.

``recipe.calibration.offload`` (``qdiff calibrate --offload``):

* ``none`` — the whole pipeline is resident on the device (the default);
* ``model`` — diffusers' ``enable_model_cpu_offload``: each component (text encoder, denoiser, VAE) is moved to the
  device only while it runs. Helps when the parts fit one at a time; on a CPU run it changes nothing;
* ``sequential`` — the denoiser's *blocks* (every element of a top-level ``ModuleList``, e.g. ``down_blocks.1`` or
  ``transformer_blocks.7``, and ``mid_block``) are kept in a safetensors file on disk — the source checkpoint
  itself when the pipeline is loaded by :func:`load_offloaded`, else a temp copy written from memory — and each is
  read (plain reads, no memory map: :class:`qdiff.export.checkpoint.CheckpointReader`) into its module, in the
  dtype of its meta parameters, on the device of the resident parts, by a forward pre-hook, and set back to
  ``meta`` by a forward hook. Everything outside the blocks (embeddings, ``conv_in``/``conv_out``, norms) stays
  resident. Peak memory: resident parts + the other components + about two blocks (one pinned, one running).

Calibration code that touches a layer outside a forward (sensitivity's fake-quantized weights, its per-layer local
runs, the resume fingerprint) wraps that in :func:`pinned`, which keeps the layer's block materialised (and so keeps
an in-place edit of its weights) until the block exits; without offloading :func:`pinned` does nothing. The float
values are the checkpoint's, cast as the non-offloaded load casts them, so plans and ranges are identical (tested).
The price is time: every denoiser call reads every block from disk (the page cache helps when RAM allows).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import types
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from qdiff.config.sections import OFFLOAD_MODES
from qdiff.errors import QdiffError

_ATTR = "_qdiff_offload"  # the BlockOffload of an offloaded denoiser (a plain attribute, not a submodule)
_MODEL_ATTR = "_qdiff_model_offload"  # set while enable_model_cpu_offload's hooks are installed by offloaded()


def block_names(den: nn.Module) -> list[str]:
    """The offloaded units: every element of a top-level ``ModuleList`` and ``mid_block`` when present."""
    names = []
    for name, child in den.named_children():
        if isinstance(child, nn.ModuleList):
            names += [f"{name}.{i}" for i in range(len(child))]
        elif name == "mid_block" and child is not None:
            names.append(name)
    return names


class BlockOffload:
    """Blocks of ``den`` kept in ``reader`` (a safetensors checkpoint with ``den``'s key names) and materialised on
    ``device`` for their forward; reference counted, so a pinned block stays through nested forwards."""

    def __init__(self, den: nn.Module, reader, device: torch.device, cleanup: Path | None = None) -> None:
        self.den, self.reader, self.device, self.cleanup = den, reader, torch.device(device), cleanup
        self.blocks = {name: den.get_submodule(name) for name in block_names(den)}
        self.count = dict.fromkeys(self.blocks, 0)
        self.handles = []
        for name, block in self.blocks.items():
            pre, post = (lambda _m, _a, n=name: self.acquire(n)), (lambda _m, _a, _o, n=name: self.release(n))
            self.handles.append(block.register_forward_pre_hook(pre))
            self.handles.append(block.register_forward_hook(post, always_call=True))  # also when forward raises
        for block in self.blocks.values():  # .to(device / dtype) while a block is on meta: see _block_apply
            block._apply = types.MethodType(_block_apply, block)
        object.__setattr__(den, _ATTR, self)

    # --- materialise / release ----------------------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        if self.count[name] == 0:
            self._load(name)
        self.count[name] += 1

    def release(self, name: str) -> None:
        self.count[name] -= 1
        if self.count[name] == 0:
            self._free(name)

    def _tensors(self, name: str) -> Iterator[tuple[dict, str, torch.Tensor, str]]:
        """(owner's _parameters or _buffers, leaf, current tensor, checkpoint key) of every stored block tensor."""
        for mod_name, module in self.blocks[name].named_modules(prefix=name):
            for table in (module._parameters, module._buffers):
                for leaf, t in table.items():
                    key = f"{mod_name}.{leaf}"
                    if t is not None and key in self.reader:
                        yield table, leaf, t, key

    def _load(self, name: str) -> None:
        for table, leaf, t, key in list(self._tensors(name)):
            value = self.reader.get(key)
            value = value.to(device=self.device, dtype=t.dtype if value.is_floating_point() else value.dtype)
            table[leaf] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value

    def _free(self, name: str) -> None:
        for table, leaf, t, _ in list(self._tensors(name)):
            meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
            table[leaf] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta

    @contextlib.contextmanager
    def pinned(self, layers: Iterable[str]) -> Iterator[None]:
        """Keep the blocks holding ``layers`` (module names of ``den``) materialised inside the block."""
        names = sorted({b for layer in layers for b in self.blocks if layer == b or layer.startswith(b + ".")})
        done = []
        try:
            for name in names:
                self.acquire(name)
                done.append(name)
            yield
        finally:
            for name in reversed(done):
                self.release(name)

    def check_finite(self) -> None:
        """NaN / Inf weights refused before any sampling, as without offloading: one block at a time."""
        from qdiff.utils.finite import check_parameters

        check_parameters(self.den)  # the resident parts (meta tensors are skipped)
        for name in self.blocks:
            with self.pinned([name]):
                check_parameters(self.blocks[name], what=f"denoiser block {name!r}")

    def restore(self) -> None:
        """Materialise every block for good and remove the hooks (the pipeline is left as it was given)."""
        for name in self.blocks:
            if self.count[name] == 0:
                self._load(name)
        self.close()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for block in self.blocks.values():
            vars(block).pop("_apply", None)
        self.reader.close()
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)
        if getattr(self.den, _ATTR, None) is self:
            object.__delattr__(self.den, _ATTR)


def _block_apply(block: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """``Module._apply`` of an offloaded block (``.to``, ``.float()``, ...): real tensors are converted as usual;
    a ``meta`` placeholder (which cannot be copied to a device) takes the dtype ``fn`` gives and stays on meta."""
    for module in block.modules():
        for table in (module._parameters, module._buffers):
            for leaf, t in table.items():
                if t is None:
                    continue
                if t.is_meta:
                    new = torch.empty(t.shape, dtype=fn(torch.empty(0, dtype=t.dtype)).dtype, device="meta")
                else:
                    new = fn(t)
                table[leaf] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return block


def get_offload(den: nn.Module) -> BlockOffload | None:
    return getattr(den, _ATTR, None)


def is_offloaded(pipe) -> bool:
    """Whether ``pipe`` runs offloaded already (inside :func:`offloaded`, or loaded by :func:`load_offloaded`)."""
    from qdiff.models.adapters import find_denoiser

    den = find_denoiser(pipe)[1]
    return get_offload(den) is not None or bool(getattr(den, _MODEL_ATTR, False))


def check_weights(den: nn.Module) -> None:
    """NaN / Inf weights refused (``check_parameters``); an offloaded denoiser's blocks are read one at a time."""
    from qdiff.utils.finite import check_parameters

    off = get_offload(den)
    if off is None:
        check_parameters(den)
    else:
        off.check_finite()


@contextlib.contextmanager
def pinned(den: nn.Module, layers: Iterable[str]) -> Iterator[None]:
    """:meth:`BlockOffload.pinned` when ``den`` is offloaded, else nothing."""
    off = get_offload(den)
    if off is None:
        yield
        return
    with off.pinned(layers):
        yield


def _device_of(den: nn.Module) -> torch.device:
    return next((p.device for p in den.parameters() if not p.is_meta), torch.device("cpu"))


def offload_to_disk(den: nn.Module, folder: Path | None = None) -> BlockOffload:
    """Offload an in-memory denoiser: its block tensors are written to a temp safetensors file (in ``folder``, or a
    temp folder) and replaced by ``meta``; :meth:`BlockOffload.restore` reads them back."""
    from qdiff.export.checkpoint import open_checkpoint
    from qdiff.export.save import write_state_dict

    if get_offload(den) is not None:
        return get_offload(den)
    device = _device_of(den)
    tmp = Path(tempfile.mkdtemp(prefix="qdiff-offload-", dir=folder))
    try:
        prefixes = tuple(f"{b}." for b in block_names(den))
        state = {k: v.detach() for k, v in den.state_dict().items() if k.startswith(prefixes)}
        entry = write_state_dict(state, tmp)
        del state
        off = BlockOffload(den, open_checkpoint(tmp / entry), device, cleanup=tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in off.blocks:
        off._free(name)
    return off


@contextlib.contextmanager
def offloaded(pipe, mode: str, work: Path | None = None) -> Iterator[None]:
    """Run the block with ``pipe`` offloaded as ``mode`` says (see the module docstring); restored on exit.

    A denoiser already offloaded (:func:`load_offloaded`) stays so; it is never fully materialised."""
    from qdiff.models.adapters import find_denoiser

    if mode not in OFFLOAD_MODES:
        raise QdiffError(f"offload: got {mode!r}, allowed values are {', '.join(map(repr, OFFLOAD_MODES))}")
    _, den = find_denoiser(pipe)
    if get_offload(den) is not None or mode == "none":
        yield
        return
    if mode == "model":
        device = _device_of(den)
        pipe.enable_model_cpu_offload(device=device)
        object.__setattr__(den, _MODEL_ATTR, True)
        try:
            yield
        finally:
            object.__delattr__(den, _MODEL_ATTR)
            pipe.remove_all_hooks()
            pipe.to(device)
        return
    off = offload_to_disk(den, work)
    try:
        yield
    finally:
        off.restore()


def load_offloaded(spec: str, torch_dtype=None):
    """A diffusers pipeline folder loaded with its denoiser's blocks left on disk (``sequential`` offload): the
    denoiser is built on ``meta``, its resident tensors are read from the checkpoint, the rest of the pipeline loads
    as usual. Peak memory never holds the whole denoiser."""
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    from qdiff.config.dtypes import as_torch_dtype, dtype_kwargs
    from qdiff.export.checkpoint import open_checkpoint
    from qdiff.export.stream import _denoiser_class_of, resolve_source

    src = resolve_source(spec)
    if src.pipeline is None:
        raise QdiffError(f"--offload sequential: {spec} is not a diffusers pipeline folder (model_index.json)")
    dtype = as_torch_dtype(torch_dtype)
    config = {k: v for k, v in src.config.items() if k != "_name_or_path"}
    cls, attr = _denoiser_class_of(config["_class_name"], src.weights)
    with init_empty_weights(include_buffers=False):
        den = cls.from_config(config)
    reader = open_checkpoint(src.weights)
    try:
        expected = den.state_dict()
        missing = sorted(set(expected) - set(reader.keys())) or sorted(set(reader.keys()) - set(expected))
        if missing:
            raise QdiffError(f"{reader.source}: checkpoint and config disagree on tensor {missing[0]!r}")
        prefixes = tuple(f"{b}." for b in block_names(den))
        resident = {}
        for key in expected:
            if not key.startswith(prefixes):
                value = reader.get(key)
                resident[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        den.load_state_dict(resident, strict=False, assign=True)
        del resident
        if dtype is not None:
            den.to(dtype)  # the meta blocks too: they materialise in this dtype
        else:
            _meta_dtypes_from(den, reader)
        den.register_to_config(_name_or_path=str(src.weights))
        BlockOffload(den, reader, torch.device("cpu"))
    except BaseException:
        reader.close()
        raise
    pipe = DiffusionPipeline.from_pretrained(
        str(src.pipeline), **{attr: den.eval()}, local_files_only=True, use_safetensors=True, **dtype_kwargs(dtype)
    )
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(_name_or_path=spec)
    return pipe


def _meta_dtypes_from(den: nn.Module, reader) -> None:
    """Without a dtype, the meta block tensors take their on-disk dtypes (as diffusers keeps them)."""
    for name, module in den.named_modules():
        for table in (module._parameters, module._buffers):
            for leaf, t in table.items():
                key = f"{name}.{leaf}" if name else leaf
                if t is not None and t.is_meta and key in reader and t.is_floating_point():
                    meta = torch.empty(t.shape, dtype=reader.dtype(key), device="meta")
                    table[leaf] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta


def on_device(pipe) -> None:
    """After ``place()`` moved the resident parts: the offloaded blocks materialise where those are."""
    from qdiff.models.adapters import find_denoiser

    den = find_denoiser(pipe)[1]
    off = get_offload(den)
    if off is not None:
        off.device = _device_of(den)
