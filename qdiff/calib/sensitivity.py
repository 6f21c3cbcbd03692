"""Per-layer sensitivity: one layer quantized at a time (weights and activations separately), all others FP.

MixDQ (arXiv 2405.17873, Sec. 4.2) scores the *content* group (cross-attention, feed-forward) by the SSIM
of final images vs the FP images of the same seeds and the *quality* group by the SQNR of the denoiser
output vs FP, running the whole pipeline once per layer x bit-width x tensor kind (``mode: full``).

``mode: fast`` replaces the pipeline runs by cached inputs recorded once on ``fast_prompts`` prompts:

* ``proxy: local``    — SQNR of the layer's own output on its cached inputs (no other layer runs);
* ``proxy: denoiser`` — SQNR of the denoiser output on the cached denoiser calls (one forward per
  call, no sampling loop, no VAE);
* ``proxy: gain``     — local SQNR of every candidate, shifted by the layer's measured local-to-output
  gain (one cached-denoiser pass per layer and tensor kind instead of one per candidate).

Numerics come from the same :class:`~qdiff.quant.modules.QuantLayer` code the quantized model uses
(``fake_weight`` / ``fake_act``). Rows are journaled per layer (:class:`~qdiff.calib.table.Journal`),
so an interrupted run resumes where it stopped and produces the same table.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiff.calib.capture import capturing, collecting_outputs, first_output
from qdiff.calib.metrics import sqnr_db, ssim
from qdiff.calib.offload import pinned
from qdiff.calib.stats import CapturedStats, LayerStats
from qdiff.calib.table import SQNR_CAP, Journal, SensitivityTable
from qdiff.config.layer import LayerQuant
from qdiff.config.recipe import Recipe
from qdiff.models.adapters import CONTENT, LayerInfo, find_denoiser, get_adapter
from qdiff.quant.modules import quant_module_for
from qdiff.sampling.draw import draw
from qdiff.sampling.prompts import load_prompts
from qdiff.utils.progress import progress_bar


def analyzed_layers(infos: Sequence[LayerInfo], recipe: Recipe) -> list[LayerInfo]:
    """The layers a plan may quantize: not protected (unless ``quantize_protected``), not matched by ``skip``."""
    return [
        i
        for i in infos
        if (recipe.quantize_protected or not i.protected)
        and not any(fnmatch.fnmatchcase(i.name, p) for p in recipe.skip)
    ]


def candidates(info: LayerInfo, recipe: Recipe) -> list[tuple[str, int]]:
    """``[("w", 2), ("w", 4), ("w", 8), ("a", 4), ("a", 8)]``: weight bits by group, activation bits (16 = FP)."""
    s = recipe.sensitivity
    wb = s.w_bits_content if info.group == CONTENT else s.w_bits_quality
    return [("w", b) for b in sorted(set(wb))] + [("a", b) for b in sorted(set(s.a_bits)) if b != 16]


def _capped(score: float) -> float:
    return max(-SQNR_CAP, min(SQNR_CAP, score))


@contextmanager
def quantized_one(
    layer: nn.Module, kind: str, bits: int, recipe: Recipe, stats: LayerStats | None = None, bos: bool = False
) -> Iterator[None]:
    """Fake-quantize one float layer's weights (``kind="w"``) or input activations (``"a"``) inside the block.

    ``bos``: BOS-aware cross-attention K/V (token 0 keeps FP activations and FP weights). Static activation
    ranges come from ``stats`` with the recipe's observer. Everything is restored on exit.
    """
    w, act = recipe.weights, recipe.activations
    handles = []
    w_fp = layer.weight.data
    if kind == "w":
        qcfg = LayerQuant(
            w_bits=bits, granularity=w.granularity, group_size=w.group_size, method=w.method, a_bits=None
        )
        layer.weight.data = quant_module_for(layer, qcfg).fake_weight().detach().to(w_fp.dtype)
        if bos:

            def fp_row(_m, args, out):  # token 0 through the FP weight
                b = None if layer.bias is None else layer.bias
                return torch.cat([F.linear(args[0][:, :1], w_fp, b), out[:, 1:]], dim=1)

            handles.append(layer.register_forward_hook(fp_row))
    else:
        qcfg = LayerQuant(w_bits=8, a_bits=bits, a_mode=act.mode)
        qm = quant_module_for(layer, qcfg)
        if qcfg.static_act:
            if stats is None or stats.num_updates == 0:
                raise RuntimeError("static activation sensitivity needs captured statistics for this layer")
            qm.set_act_qparams(*stats.qparams(act.observer, bits, False, act.percentile))

        def fake_input(_m, args):
            x = args[0]
            if bos and x.dim() == 3:
                return (torch.cat([x[:, :1], qm.fake_act(x[:, 1:])], dim=1), *args[1:])
            return (qm.fake_act(x), *args[1:])

        handles.append(layer.register_forward_pre_hook(fake_input))
    try:
        yield
    finally:
        layer.weight.data = w_fp
        for h in handles:
            h.remove()


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _batch_calls(calls: list[tuple[tuple, dict, Tensor]]) -> tuple[tuple, dict] | None:
    """All cached denoiser calls as one call (tensors concatenated along the batch; a 0-d timestep is
    expanded per sample), or ``None`` when the calls do not have the same structure."""
    if len(calls) < 2:
        return None
    sizes = [c[2].shape[0] for c in calls]

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, Tensor):
            if not all(isinstance(v, Tensor) and v.shape[1:] == first.shape[1:] for v in values):
                raise ValueError
            if first.dim() == 0:
                return torch.cat([v.reshape(1).expand(n) for v, n in zip(values, sizes)])
            if any(v.shape[0] != n for v, n in zip(values, sizes)):
                raise ValueError
            return torch.cat(values)
        if isinstance(first, dict):
            if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
                raise ValueError
            return {k: merge([v[k] for v in values]) for k in first}
        if isinstance(first, (list, tuple)):
            if any(len(v) != len(first) for v in values):
                raise ValueError
            return type(first)(merge(list(col)) for col in zip(*values))
        if any(v != first for v in values):
            raise ValueError
        return first

    try:
        return merge([c[0] for c in calls]), merge([c[1] for c in calls])
    except (ValueError, TypeError):
        return None


class _Scorer:
    """Scores one (layer, kind, bits) according to the mode; holds the FP references."""

    def __init__(self, pipe, den: nn.Module, recipe: Recipe, names: list[str], bos: set[str], progress: bool):
        s, cal = recipe.sensitivity, recipe.calibration
        self.pipe, self.den, self.recipe, self.mode, self.bs = pipe, den, recipe, s.mode, cal.batch_size
        self.device = next(den.parameters()).device
        if s.mode == "full":
            self.prompts = load_prompts(cal.prompts, s.num_prompts)
            with collecting_outputs(den) as outs:
                self.fp_images = draw(pipe, self.prompts, None, recipe.sampler, self.bs)
            self.fp_outputs = torch.cat([o.reshape(-1) for o in outs])
            return
        self.prompts = load_prompts(cal.prompts, s.fast_prompts)
        layers = {n: den.get_submodule(n) for n in names}
        cache = names if s.proxy in ("local", "gain") else ()
        calls = s.proxy in ("denoiser", "gain")
        with capturing(den, layers, bos_layers=bos, cache_inputs=cache, cache_denoiser=calls) as cap:
            desc = "caching inputs" if progress else None
            draw(
                pipe,
                self.prompts,
                None,
                recipe.sampler,
                self.bs,
                output_type="latent",
                desc=desc,
                on_batch=cap.new_call,
                keep=False,
            )
        self.inputs, self.calls = cap.inputs, cap.denoiser_calls
        self.batched = _batch_calls(self.calls) if calls else None
        self.fp_calls = None
        if calls:
            per_call = torch.cat([c[2].float().reshape(-1) for c in self.calls])
            if self.batched is not None:  # one forward over all cached calls, if it reproduces them
                batched = self._denoiser()
                if not torch.allclose(batched, per_call, rtol=1e-3, atol=1e-4 * float(per_call.abs().max())):
                    self.batched = None
            self.fp_calls = self._denoiser() if self.batched is not None else per_call
        self.fp_local = {n: self._local(n) for n in cache}

    @torch.no_grad()
    def _local(self, name: str) -> Tensor:
        layer = self.den.get_submodule(name)
        with pinned(self.den, [name]):  # an offloaded block is materialised for a layer run alone
            return torch.cat([layer(x.to(self.device)).float().cpu().reshape(-1) for x in self.inputs[name]])

    @torch.no_grad()
    def _denoiser(self) -> Tensor:
        if self.batched is not None:
            args, kwargs = self.batched
            return (
                first_output(self.den(*_to(args, self.device), **_to(kwargs, self.device))).float().cpu().reshape(-1)
            )
        outs = [first_output(self.den(*_to(a, self.device), **_to(k, self.device))) for a, k, _ in self.calls]
        return torch.cat([o.float().cpu().reshape(-1) for o in outs])

    def score_layer(self, info: LayerInfo, layer: nn.Module, stats: LayerStats | None, bos: bool) -> dict:
        """``{"w": {bits: score}, "a": {bits: score}}`` for every candidate of one layer.

        ``proxy: gain`` scores every candidate by its local output SQNR, shifted by the layer's gain
        ``G = local - denoiser`` measured once per tensor kind with one probe candidate (weights: the
        lowest bits >= 4; activations: the highest bits): the error of every candidate enters the network
        at the same place (the layer's output), so to first order it reaches the denoiser output
        attenuated by the same factor. Two denoiser passes per layer instead of one per candidate.
        """
        cands = candidates(info, self.recipe)
        scores: dict[str, dict[str, float]] = {"w": {}, "a": {}}
        gain = self.mode == "fast" and self.recipe.sensitivity.proxy == "gain"
        for kind, bits in cands:
            with quantized_one(layer, kind, bits, self.recipe, stats, bos):
                scores[kind][str(bits)] = self.score(info, local=gain)
        if gain:
            scores = self._shift_by_gain(layer, cands, scores, stats, bos)
        return scores

    def _shift_by_gain(self, layer, cands, local: dict, stats, bos: bool) -> dict:
        """Local scores shifted by the measured local-to-output gain, one probe per tensor kind."""
        out: dict[str, dict[str, float]] = {"w": {}, "a": {}}
        for kind in ("w", "a"):
            bits = [b for k, b in cands if k == kind]
            if not bits:
                continue
            probe = min([b for b in bits if b >= 4] or bits) if kind == "w" else max(bits)
            with quantized_one(layer, kind, probe, self.recipe, stats, bos):
                probe_score = _capped(sqnr_db(self.fp_calls, self._denoiser()))
            shift = local[kind][str(probe)] - probe_score
            out[kind] = {b: _capped(v - shift) for b, v in local[kind].items()}
            out[kind][str(probe)] = probe_score
        return out

    def metric(self, info: LayerInfo) -> str:
        return metric_name(self.recipe, info)

    @torch.no_grad()
    def score(self, info: LayerInfo, local: bool = False) -> float:
        """Score of the model as it currently is (one layer under :func:`quantized_one`)."""
        metric = self.metric(info)
        if metric == "local_sqnr" or local:
            return _capped(sqnr_db(self.fp_local[info.name], self._local(info.name)))
        if metric in ("denoiser_sqnr", "gain_sqnr"):
            return _capped(sqnr_db(self.fp_calls, self._denoiser()))
        if metric == "ssim":
            images = draw(self.pipe, self.prompts, None, self.recipe.sampler, self.bs)
            return float(ssim(self.fp_images, images).mean())
        with collecting_outputs(self.den) as outs:
            draw(self.pipe, self.prompts, None, self.recipe.sampler, self.bs, output_type="latent", keep=False)
        return _capped(sqnr_db(self.fp_outputs, torch.cat([o.reshape(-1) for o in outs])))


def metric_name(recipe: Recipe, info: LayerInfo) -> str:
    """The score column of a layer: ``<proxy>_sqnr`` in fast mode, else the group's content / quality metric."""
    s = recipe.sensitivity
    if s.mode == "fast":
        return f"{s.proxy}_sqnr"
    return s.content_metric if info.group == CONTENT else s.quality_metric


def fingerprint(den: nn.Module, infos: Sequence[LayerInfo], recipe: Recipe, bos: set[str]) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption."""
    h = hashlib.sha256()
    for info in infos:
        with pinned(den, [info.name]):
            w = den.get_submodule(info.name).weight.detach()
            h.update(
                f"{info.name}:{tuple(w.shape)}:{float(w.double().sum()):.17g}:{float(w.double().abs().sum()):.17g};".encode()
            )
    r = recipe.to_dict()
    r["calibration"].pop("offload", None)  # how the run holds the weights, not what it computes
    keep = ("weights", "activations", "sampler", "calibration", "sensitivity", "skip", "quantize_protected")
    return {"table": 1, "model": h.hexdigest(), "recipe": {k: r[k] for k in keep}, "bos": sorted(bos)}


def analyze(
    pipe,
    recipe: Recipe,
    *,
    stats: CapturedStats | None = None,
    journal: str | Path | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> SensitivityTable:
    """Sensitivity table of ``pipe``'s denoiser (left unchanged) under ``recipe.sensitivity``.

    ``stats``: captured ranges (needed for static activations and for the activation sizes; captured
    here over the calibration prompts when missing). ``journal``: JSONL path to resume from / append to.
    ``layers``: restrict to these names (tests). ``on_row`` is called after each row is journaled.
    """
    from qdiff.calib.capture import capture_stats

    t0 = time.perf_counter()
    _, den = find_denoiser(pipe)
    adapter = get_adapter(den)
    infos = analyzed_layers(adapter.layers(den), recipe)
    if layers is not None:
        wanted = set(layers)
        infos = [i for i in infos if i.name in wanted]
    names = [i.name for i in infos]
    bos = set(adapter.cross_attention_kv(den)) & set(names) if recipe.bos_aware else set()
    if stats is None:
        stats = capture_stats(pipe, recipe, names=names, progress=progress)
    book = Journal(journal, fingerprint(den, infos, recipe, bos)) if journal is not None else None
    done = dict(book.done) if book else {}
    todo = [i for i in infos if i.name not in done]
    scorer = _Scorer(pipe, den, recipe, names, bos, progress) if todo else None
    t_setup = time.perf_counter() - t0
    rows = {}
    for info in progress_bar(todo, desc=f"sensitivity ({recipe.sensitivity.mode})", unit="layer", enabled=progress):
        layer, st = den.get_submodule(info.name), stats.layers.get(info.name)
        with pinned(den, [info.name]):  # its block stays materialised while the layer is fake-quantized
            scores = scorer.score_layer(info, layer, st, info.name in bos)
        row = {
            "name": info.name, "group": info.group, "kind": info.kind, "params": info.weight_numel,
            "act_numel": int(st.numel_per_sample) if st is not None else 0, "metric": scorer.metric(info), **scores,
        }  # fmt: skip
        if book:
            book.add(row)
            row = book.done[info.name]
        rows[info.name] = row
        if on_row is not None:
            on_row(row)
    rows.update(done)
    ordered = [json.loads(json.dumps(rows[n])) for n in names]
    mode = recipe.sensitivity.mode
    meta = {
        "mode": mode, "proxy": recipe.sensitivity.proxy if mode == "fast" else None,
        "prompts": scorer.prompts if scorer else None, "resumed_rows": len(done), "bos_layers": sorted(bos),
        "setup_s": round(t_setup, 3), "wall_s": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
    return SensitivityTable(ordered, meta)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties), float64; NaN if a ranking is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("need two sequences of the same length >= 2")

    def ranks(v: Sequence[float]) -> Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t, stable=True)
        r = torch.empty_like(t)
        i, n = 0, len(v)
        sorted_v = t[order]
        while i < n:
            j = i
            while j + 1 < n and sorted_v[j + 1] == sorted_v[i]:
                j += 1
            r[order[i : j + 1]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / den if den else math.nan


__all__ = ["analyze", "analyzed_layers", "candidates", "quantized_one", "spearman"]
