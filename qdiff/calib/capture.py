"""Run the few-step sampler over prompts while observers record layer-input statistics.

Observers and hooks are attached for the duration of a ``with`` block and always removed on exit, also
when the sampler raises. Only statistics are kept (:mod:`qdiff.calib.stats`: per layer and per step
min/max, EMA, a bounded histogram), never raw activations, unless a stage asks for cached inputs
(``cache_inputs`` / ``cache_denoiser``, used by the fast sensitivity mode on a few prompts).

Step index = the index of the denoiser call within one pipeline call (classifier-free guidance batches
the conditional and unconditional branches into one call in every supported pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from qdiff.calib.stats import CapturedStats, LayerStats
from qdiff.errors import QdiffError
from qdiff.quant.modules import QuantLayer
from qdiff.quant.observers import Observer
from qdiff.quant.split import part_keys, split_parts
from qdiff.sampling.draw import draw
from qdiff.utils.finite import NonFiniteError


@dataclass
class Observed:
    """What an :func:`observing` block yields: the observers by layer and the current denoiser-call index."""

    observers: dict[str, Observer]
    step: int = -1

    def new_call(self, _batch: int = 0) -> None:
        """Restart the step counter: the next denoiser call is step 0 of a new pipeline call."""
        self.step = -1


class _Guarded:
    """What a layer feeds during :func:`observing`: its observer, with the layer and step named on NaN / Inf."""

    def __init__(self, name: str, observer: Observer, state: Observed) -> None:
        self.name, self.observer, self.state = name, observer, state

    def update(self, x: Tensor) -> None:
        try:
            self.observer.update(x)
        except NonFiniteError as exc:
            raise nonfinite_input(self.name, self.state.step, exc) from None


def nonfinite_input(name: str, step: int, exc: NonFiniteError) -> QdiffError:
    """The calibration error for a layer input holding NaN / Inf."""
    return QdiffError(
        f"calibration: input of layer {name!r} at sampling step {max(step, 0)} has {exc}; the float model produces "
        "non-finite activations on the calibration prompts (check its weights, dtype and sampler settings)"
    )


@contextmanager
def observing(
    layers: Mapping[str, QuantLayer], make: Callable[[str], Observer], denoiser: nn.Module | None = None
) -> Iterator[Observed]:
    """Attach a fresh observer from ``make(name)`` to each layer; detach them all on exit.

    ``denoiser`` (optional) counts its calls so that a NaN / Inf input is reported with its sampling step; pass
    ``on_batch=observed.new_call`` to :func:`qdiff.sampling.draw.draw` to restart the count per pipeline call.
    """
    state = Observed({name: make(name) for name in layers})
    handle = None
    try:
        if denoiser is not None:
            handle = denoiser.register_forward_pre_hook(lambda _m, _a: setattr(state, "step", state.step + 1))
        for name, layer in layers.items():
            layer.observer = _Guarded(name, state.observers[name], state)  # type: ignore[assignment]
        yield state
    finally:
        if handle is not None:
            handle.remove()
        for layer in layers.values():
            layer.observer = None


# ---- statistics capture with forward pre-hooks (works on float or quantized layers) -----------------------------
def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def first_output(out: Any) -> Tensor:
    """The sample tensor of a denoiser's output (tuple, ``BaseOutput`` or tensor)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


@dataclass
class Capture:
    """What a :func:`capturing` block records. ``step`` is the current denoiser call index (-1 before the first)."""

    stats: dict[str, LayerStats]
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)  # cached layer inputs (CPU), when asked for
    denoiser_calls: list[tuple[tuple, dict, Tensor]] = field(default_factory=list)  # (args, kwargs, output)
    step: int = -1

    def new_call(self, _batch: int = 0) -> None:
        """Restart the step counter: the next denoiser call is step 0 of a new pipeline call."""
        self.step = -1

    def result(self, meta: dict[str, Any] | None = None) -> CapturedStats:
        return CapturedStats(dict(self.stats), dict(meta or {}))


def drop_bos(x: Tensor) -> Tensor:
    """Token 0 removed from a ``(B, T, C)`` encoder-hidden-states input (BOS-aware cross-attention K/V)."""
    return x[:, 1:] if x.dim() == 3 else x


@contextmanager
def capturing(
    denoiser: nn.Module,
    layers: Mapping[str, nn.Module],
    *,
    bins: int = 1024,
    momentum: float = 0.95,
    bos_layers: Collection[str] = (),
    cache_inputs: Collection[str] = (),
    cache_denoiser: bool = False,
    splits: Mapping[str, int] | None = None,
    make_stats: Callable[[int, float], LayerStats] = LayerStats,
) -> Iterator[Capture]:
    """Record the input statistics of ``layers`` at every denoiser call; all hooks are removed on exit.

    ``bos_layers``: token 0 of their input is excluded (BOS-aware K/V). ``cache_inputs``: layers whose raw
    inputs are also kept (CPU). ``cache_denoiser``: keep every denoiser call's inputs and output (CPU).
    ``splits``: layer -> input channel where the second part starts; those layers also get statistics of each
    part under :func:`qdiff.quant.split.part_keys` (the whole input stays under the layer's name).
    Call ``capture.new_call()`` before each pipeline call (``qdiff.sampling.draw.draw(on_batch=...)`` does).
    ``make_stats(bins, momentum)`` builds each layer's statistics (a distributed capture records more).
    """
    splits = {n: s for n, s in (splits or {}).items() if n in layers}
    cap = Capture({name: make_stats(bins, momentum) for name in layers})
    cap.stats.update({key: make_stats(bins, momentum) for name in splits for key in part_keys(name)})
    bos, cache = set(bos_layers), set(cache_inputs)
    handles = []

    def den_pre(_module, _args):
        cap.step += 1

    def make_hook(name: str):
        def hook(_module, args):
            x = raw = args[0]
            if name in bos:
                x = drop_bos(x)
            pieces = [(name, x)]
            if name in splits:
                pieces += list(zip(part_keys(name), split_parts(x, splits[name])))
            for key, piece in pieces:
                st = cap.stats[key]
                try:
                    st.update(piece, max(cap.step, 0))
                except NonFiniteError as exc:
                    raise nonfinite_input(key, cap.step, exc) from None
                st.numel_per_sample = max(st.numel_per_sample, piece.numel() // max(1, piece.shape[0]))
            if name in cache:
                cap.inputs.setdefault(name, []).append(raw.detach().to("cpu").clone())  # token 0 included

        return hook

    def den_post(_module, args, kwargs, out):
        cap.denoiser_calls.append((_to_cpu(args), _to_cpu(kwargs), first_output(out).detach().to("cpu").clone()))

    try:
        handles.append(denoiser.register_forward_pre_hook(den_pre))
        for name, mod in layers.items():
            handles.append(mod.register_forward_pre_hook(make_hook(name)))
        if cache_denoiser:
            handles.append(denoiser.register_forward_hook(den_post, with_kwargs=True))
        yield cap
    finally:
        for h in handles:
            h.remove()


@contextmanager
def collecting_outputs(denoiser: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the denoiser's output sample at every call (CPU float32); the hook is removed on exit."""
    outputs: list[Tensor] = []

    def hook(_module, _args, out):
        outputs.append(first_output(out).detach().float().cpu())

    handle = denoiser.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def capture_stats(
    pipe,
    recipe,
    *,
    names: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    bins: int = 1024,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
    make_stats: Callable[[int, float], LayerStats] = LayerStats,
) -> CapturedStats:
    """Run the recipe's sampler over its calibration prompts and return per-layer, per-step statistics.

    ``names``: layers to observe (default: every quantizable layer of the denoiser). With
    ``recipe.bos_aware`` token 0 of the cross-attention K/V inputs is left out of their statistics. With
    ``activations.split_skip`` layers with an adapter split also get per-part statistics (meta ``split_layers``).
    ``prompts``/``seeds``: a shard of the calibration prompts and their seeds (default: all, the recipe's seeds).
    """
    from qdiff.models.adapters import find_denoiser, get_adapter
    from qdiff.sampling.prompts import load_prompts

    _, den = find_denoiser(pipe)
    adapter = get_adapter(den)
    infos = adapter.layers(den)
    if names is None:
        names = [i.name for i in infos]
    layers = {n: den.get_submodule(n) for n in names}
    split_skip = recipe.activations.split_skip
    splits = {i.name: i.a_split for i in infos if split_skip and i.a_split and i.name in layers}
    bos = sorted(set(adapter.cross_attention_kv(den)) & set(names)) if recipe.bos_aware else []
    cal = recipe.calibration
    prompts = list(prompts or load_prompts(cal.prompts, cal.num_prompts))
    momentum = recipe.activations.momentum
    with capturing(den, layers, bins=bins, momentum=momentum, bos_layers=bos, splits=splits,
                   make_stats=make_stats) as cap:  # fmt: skip
        desc = "capturing ranges" if progress else None
        draw(
            pipe,
            prompts,
            seeds,
            recipe.sampler,
            cal.batch_size,
            output_type="latent",
            desc=desc,
            on_batch=cap.new_call,
            keep=False,
        )
    meta = {"prompts": prompts, "sampler": recipe.to_dict()["sampler"], "bos_layers": bos, "bins": bins,
            "split_layers": splits}  # fmt: skip
    return cap.result(meta)
