"""Peer quantizers for ``qdiff eval --peers``: bitsandbytes, optimum-quanto and torchao on the same layers.

Each :class:`Peer` builds its variant from a fresh copy of the float reference pipeline and quantizes the layers
qdiff's adapter and recipe select (:func:`peer_layers`), except those its library cannot quantize here, which stay
float with the reason in the peer's note. :data:`PEERS` is the one declaration (name -> peer, read-only).
:func:`add_peers` adds them to an :class:`~qdiff.eval.run.Evaluator`; a peer whose library is missing, or that
fails to build or to generate on this device / version, becomes an empty row plus a note with its one-line reason.

The libraries are imported only when a peer is built (the optional extra ``qdiff[peers]``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.eval.peers_openvino import OPENVINO_PEERS, EnginePeer
from qdiff.utils.lazy_imports import BNB_NOTICES, dropping_notices, import_bitsandbytes

INSTALL_HINT = "not installed: pip install 'qdiff[peers]'"
NF4_BLOCK = 64  # bitsandbytes Params4bit default blocksize (absmax per 64 weights)
LLM_INT8_THRESHOLD = 6.0  # bitsandbytes / transformers default: |x| > 6 input columns run in float


@dataclass(frozen=True)
class Built:
    """What a quantize function reports: its pipeline's denoiser is quantized in place."""

    detail: str  # the peer-specific part of the note (settings, workarounds)


QuantizeFn = Callable[[object, nn.Module, list[str], Recipe], Built]
RefuseFn = Callable[[nn.Module, Recipe], "str | None"]


@dataclass(frozen=True)
class Peer:
    """One peer quantizer: a library, the layer kinds it quantizes here and the function that does it."""

    name: str
    module: str  # importable module of the library (its presence decides "not installed")
    summary: str  # the scheme, one phrase
    kinds: tuple[type[nn.Module], ...]  # layer types quantized; the others stay float for ``float_reason``
    float_reason: str
    quantize: QuantizeFn  # (pipe, denoiser, layer names, recipe) -> Built; quantizes in place
    refuse: RefuseFn | None = None  # per-layer limits of the library: the reason a layer of ``kinds`` stays float

    def available(self) -> bool:
        return _has_module(self.module)

    def build(self, pipe_factory: Callable[[], object], recipe: Recipe, layers: list[str]) -> tuple[object, str]:
        """A fresh reference pipeline (``pipe_factory()``) with ``layers`` of its denoiser quantized by this peer.

        Returns ``(pipe, note)``; the note says what was quantized and which layers stayed float and why.
        Raises :class:`QdiffError` ("not installed: ...") when the library is missing; library errors propagate.
        """
        from qdiff.models.adapters import find_denoiser

        if not self.available():
            raise QdiffError(INSTALL_HINT)
        pipe = pipe_factory()
        den = find_denoiser(pipe)[1]
        chosen: list[str] = []
        kept: dict[str, list[str]] = {}  # reason -> layers left float
        for name in layers:
            module = den.get_submodule(name)
            if not isinstance(module, self.kinds):
                kept.setdefault(self.float_reason, []).append(name)
            elif self.refuse is not None and (why := self.refuse(module, recipe)):
                kept.setdefault(why, []).append(name)
            else:
                chosen.append(name)
        with quiet_imports():
            built = self.quantize(pipe, den, chosen, recipe)
        note = f"{self.name}: {self.summary}; {len(chosen)} of {len(layers)} selected layers quantized"
        if kept:
            note += "; float: " + ", ".join(f"{_count_kinds(den, names)} ({why})" for why, names in kept.items())
        return pipe, note + (f"; {built.detail}" if built.detail else "")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _count_kinds(den: nn.Module, names: list[str]) -> str:
    counts: dict[str, int] = {}
    for n in names:
        kind = type(den.get_submodule(n)).__name__
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{c} {k}" for k, c in counts.items())


def quiet_imports() -> contextlib.AbstractContextManager[None]:
    """Drop bitsandbytes' optional-kernel notices ("... kernels-community") while a peer library is imported
    (optimum-quanto imports diffusers / transformers, which import bitsandbytes); other records pass."""
    return dropping_notices(BNB_NOTICES)


def _replace(den: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(den.get_submodule(parent_name) if parent_name else den, child, new)


# ---- bitsandbytes ---------------------------------------------------------------------------------------------
def _bnb_nf4(pipe, den: nn.Module, names: list[str], recipe: Recipe) -> Built:
    bnb = import_bitsandbytes()
    no_repack = 0
    for name in names:
        old = den.get_submodule(name)
        w = old.weight
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=w.dtype,
                                compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
        new.weight = bnb.nn.Params4bit(w.data, requires_grad=False, blocksize=NF4_BLOCK, compress_statistics=True,
                                       quant_type="nf4", module=new)  # fmt: skip
        new.bias = None if old.bias is None else nn.Parameter(old.bias.data, requires_grad=False)
        if old.in_features % NF4_BLOCK:  # the CPU AVX512-BF16 repack reshapes absmax to (N, K / 64) and fails
            new.support_avx512bf16_for_cpu = False
            no_repack += 1
        _replace(den, name, new.to(w.device))  # .to() quantizes Params4bit
    dtype = str(next(den.parameters()).dtype).replace("torch.", "")
    detail = f"NF4 blocksize {NF4_BLOCK}, double-quantized absmax, compute {dtype}"
    if no_repack:
        detail += f"; CPU AVX512-BF16 repack off for {no_repack} layer(s) with K % {NF4_BLOCK} != 0 (it fails there)"
    return Built(detail)


def _bnb_int8(pipe, den: nn.Module, names: list[str], recipe: Recipe) -> Built:
    bnb = import_bitsandbytes()
    for name in names:
        old = den.get_submodule(name)
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                  has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD, device="meta")  # fmt: skip
        new.weight = bnb.nn.Int8Params(old.weight.data, requires_grad=False, has_fp16_weights=False)
        new.bias = None if old.bias is None else nn.Parameter(old.bias.data, requires_grad=False)
        _replace(den, name, new.to(old.weight.device))  # .to() quantizes Int8Params (CB int8, SCB per row)
    return Built(f"LLM.int8(): per-row int8 weights, per-token int8 activations, threshold {LLM_INT8_THRESHOLD}")


# ---- optimum-quanto ------------------------------------------------------------------------------------------
def _quanto(weights: str, activations: str | None) -> QuantizeFn:
    def quantize(pipe, den: nn.Module, names: list[str], recipe: Recipe) -> Built:
        quanto = importlib.import_module("optimum.quanto")
        act = getattr(quanto, activations) if activations else None
        quanto.quantize(den, weights=getattr(quanto, weights), activations=act, include=names)
        detail = "quanto default group size (128, or the largest multiple of 32 dividing K, else per channel)"
        if act is not None:
            from qdiff.sampling.draw import draw
            from qdiff.sampling.prompts import load_prompts

            cal = recipe.calibration
            prompts = load_prompts(cal.prompts, cal.num_prompts)
            with quanto.Calibration():
                draw(pipe, prompts, None, recipe.sampler, cal.batch_size, output_type="latent", keep=False)
            detail = f"activation scales from quanto.Calibration over {len(prompts)} '{cal.prompts}' prompts"
        quanto.freeze(den)
        return Built(detail if weights == "qint4" or act is not None else "")

    return quantize


# ---- torchao ---------------------------------------------------------------------------------------------------
def _int4_group(recipe: Recipe) -> int:
    w = recipe.weights
    return int(w.group_size) if w.granularity == "group" and w.group_size else 32


def _torchao(config: str) -> QuantizeFn:
    def quantize(pipe, den: nn.Module, names: list[str], recipe: Recipe) -> Built:
        tq = importlib.import_module("torchao.quantization")
        if config != "int4":
            cfg, detail = getattr(tq, config)(), f"{config}()"
        elif _on_cuda(den):
            cfg = tq.Int4WeightOnlyConfig(group_size=_int4_group(recipe))
            detail = f"Int4WeightOnlyConfig(group_size={_int4_group(recipe)})"
        else:  # Int4WeightOnlyConfig has no CPU path (torchao 0.18 needs a CUDA kernel package)
            from torchao.quantization.granularity import PerGroup

            group = _int4_group(recipe)
            cfg = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
            detail = (
                f"CPU: IntxWeightOnlyConfig(int4, PerGroup({group})) (Int4WeightOnlyConfig needs CUDA); "
                "it stores one int4 value per byte (int8), a scale and an int8 zero-point per group"
            )
        wanted = set(names)
        tq.quantize_(den, cfg, filter_fn=lambda module, fqn: fqn in wanted)
        return Built(detail)

    return quantize


def _on_cuda(module: nn.Module) -> bool:
    return next(module.parameters()).device.type == "cuda"


def _int4_refuse(module: nn.Module, recipe: Recipe) -> str | None:
    """torchao int4: groups run along the input channels (per kernel tap for Conv2d); CUDA's config is Linear-only."""
    group = _int4_group(recipe)
    if _on_cuda(module) and not isinstance(module, nn.Linear):
        return "torchao Int4WeightOnlyConfig is Linear-only"
    return None if module.weight.shape[1] % group == 0 else f"input channels not a multiple of group {group}"


LINEAR = (nn.Linear,)
LINEAR_CONV = (nn.Linear, nn.Conv2d)
PEERS: Mapping[str, Peer | EnginePeer] = MappingProxyType({p.name: p for p in (
    Peer("bnb-nf4", "bitsandbytes", "bitsandbytes NF4 weight-only (Linear4bit)", LINEAR,
         "bitsandbytes has no Conv2d", _bnb_nf4),
    Peer("bnb-int8", "bitsandbytes", "bitsandbytes LLM.int8() W8A8 (Linear8bitLt)", LINEAR,
         "bitsandbytes has no Conv2d", _bnb_int8),
    Peer("quanto-w8a8", "optimum.quanto", "quanto qint8 weights + qint8 static activations", LINEAR_CONV,
         "", _quanto("qint8", "qint8")),
    Peer("quanto-w4", "optimum.quanto", "quanto qint4 weight-only", LINEAR_CONV, "", _quanto("qint4", None)),
    Peer("torchao-int8dq", "torchao", "torchao int8 dynamic activations + int8 weights", LINEAR,
         "torchao int8 configs fail on Conv2d: aten.convolution unimplemented for Int8Tensor",
         _torchao("Int8DynamicActivationInt8WeightConfig")),
    Peer("torchao-int8wo", "torchao", "torchao int8 weight-only", LINEAR,
         "torchao int8 configs fail on Conv2d: aten.convolution unimplemented for Int8Tensor",
         _torchao("Int8WeightOnlyConfig")),
    Peer("torchao-int4wo", "torchao", "torchao int4 weight-only", LINEAR_CONV, "", _torchao("int4"), _int4_refuse),
    *OPENVINO_PEERS,  # the CPU engine: OpenVINO fp32 and NNCF int8 (qdiff.eval.peers_openvino)
)})  # fmt: skip


def peer_names() -> list[str]:
    return list(PEERS)


def parse_peers(names: str | list[str]) -> list[str]:
    """``"bnb-nf4,quanto-w4"`` or a list -> validated names (``all`` = every peer); QdiffError names the known."""
    items = [s.strip() for s in (names.split(",") if isinstance(names, str) else names) if s.strip()]
    if items == ["all"]:
        return peer_names()
    unknown = [n for n in items if n not in PEERS]
    if unknown or not items:
        raise QdiffError(f"--peers: unknown peer {unknown[0] if unknown else '(none)'!r}; known: {', '.join(PEERS)}")
    return list(dict.fromkeys(items))


def peer_layers(den: nn.Module, recipe: Recipe) -> list[str]:
    """The denoiser layers qdiff would quantize with ``recipe`` (adapter layers minus protected / skipped)."""
    from qdiff.models.adapters import get_adapter
    from qdiff.quant.transform import layer_specs

    return list(layer_specs(get_adapter(den).layers(den), recipe))


def peer_recipe(models: Sequence[str]) -> Recipe:
    """The recipe the peers mirror (layers, calibration prompts, int4 group): the first export's among ``models``,
    else the bundled ``shapes-w4a8`` for ``builtin:shapes``, else the recipe defaults."""
    from qdiff.eval.run import SHAPES_MODEL, spec_recipe

    for spec in models:
        recipe = spec_recipe(spec)
        if recipe is not None:
            return recipe
    return Recipe.load("shapes-w4a8") if SHAPES_MODEL in models else Recipe()


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text if isinstance(exc, QdiffError) else f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_peers(
    evaluator, ref_spec: str, names: list[str], recipe: Recipe, *, device: str = "cpu", dtype: str | None = None
) -> list[str]:
    """Build each named peer from a fresh load of ``ref_spec`` (a float pipeline) and ``evaluator.add`` it.

    The peers quantize the layers :func:`peer_layers` selects with ``recipe`` (and calibrate on its calibration
    prompts). A peer that is not installed, fails to build or fails to generate gets an empty row (metrics
    ``{}``) and a note with the one-line reason. Returns one note per peer (also appended to ``evaluator.notes``).
    """
    from qdiff.export.resolve import load_pipeline, place
    from qdiff.models.adapters import find_denoiser
    from qdiff.quant.transform import get_info

    def fresh():
        pipe = load_pipeline(ref_spec)
        place(pipe, device, dtype)
        return pipe

    names = parse_peers(names)
    taken = [n for n in names if n in evaluator.metrics]
    if taken:
        raise QdiffError(f"eval: variant name {taken[0]!r} used twice")

    first = fresh()
    den = find_denoiser(first)[1]
    if get_info(den) is not None:
        raise QdiffError(f"--peers: the reference {ref_spec!r} is already quantized; pass a float pipeline")
    layers, spare = peer_layers(den, recipe), [first]  # the first build reuses the pipeline loaded here
    del first, den

    def factory():
        return spare.pop() if spare else fresh()

    notes: list[str] = []
    for name in names:
        pipe = None
        try:
            pipe, note = PEERS[name].build(factory, recipe, layers)
            evaluator.add(name, pipe)
            evaluator.notes.append(note)
        except Exception as exc:  # a peer that cannot run here is a row with its reason, never a crash
            note = f"{name}: skipped: {one_line(exc)}"
            evaluator.skip(name, note)
        pipe = None
        notes.append(note)
    return notes
