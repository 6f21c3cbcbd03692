"""Bit allocation by integer programming (MixDQ, arXiv 2405.17873, Sec. 4.3), solved with pulp's bundled CBC.

Binary ``x[i, b]``: layer ``i`` stores its weights with ``b`` bits (one per layer), and likewise
``y[i, a]`` for its input activations (``a = 16``: floating point). Constraints::

    sum_b x[i, b] = 1,  sum_a y[i, a] = 1                                  (one choice per layer)
    sum_{i,b} P_i * storage(b) * x[i, b]  <=  w_budget * sum_i P_i          (P_i: parameter count)
    sum_{i,a} E_i * a * y[i, a]           <=  a_budget * sum_i E_i          (E_i: input elements)

Weights count with their *storage* bits (3-bit weights occupy a nibble: 4), so the budget is what the
frozen ``qweight`` buffers really hold (per-channel/group scales excluded; see :func:`measured_weight_bits`).

Objective: minimise the summed, *normalised* loss. A score becomes a loss on a common scale
(SQNR in dB -> relative noise power ``10^(-SQNR/10)``; SSIM -> ``1 - SSIM``), and each group's losses
are divided by the group's total loss at its lowest candidate bits, so every group sums to 1 in the worst
case. ``joint=True`` solves both groups in one program with weights ``content_weight`` and
``1 - content_weight``. ``joint=False`` is MixDQ's mode: each group must meet the budget on its own.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulp

from qdiff.config.bits import FLOAT_ACT_BITS
from qdiff.config.plan import LayerBits, Plan
from qdiff.errors import QdiffError
from qdiff.numerics.primitives import storage_bits


@dataclass(frozen=True)
class Item:
    """One layer's allocation data: sizes and a loss per candidate (lower is better, >= 0)."""

    name: str
    group: str
    params: int
    act_numel: int
    w_loss: Mapping[int, float]  # weight bits -> loss
    a_loss: Mapping[int, float]  # activation bits (16 = FP, loss 0) -> loss


def score_to_loss(score: float, metric: str) -> float:
    """Common-scale loss: ``1 - SSIM`` for SSIM, relative noise power ``10^(-SQNR/10)`` for SQNR metrics."""
    if metric == "ssim":
        return max(0.0, 1.0 - score)
    return 10.0 ** (-score / 10.0)


def items_from_table(rows: Sequence[Mapping], a_bits: Sequence[int]) -> list[Item]:
    """Allocation items from sensitivity-table rows; ``a_bits`` lists the allowed activation bits (16 = FP)."""
    items = []
    for r in rows:
        metric = "ssim" if r["metric"] == "ssim" else "sqnr"
        w_loss = {int(b): score_to_loss(v, metric) for b, v in r["w"].items()}
        a_loss = {int(b): score_to_loss(v, metric) for b, v in r["a"].items() if int(b) in a_bits}
        if FLOAT_ACT_BITS in a_bits:
            a_loss[FLOAT_ACT_BITS] = 0.0
        items.append(Item(r["name"], r["group"], int(r["params"]), int(r["act_numel"]), w_loss, a_loss))
    return items


def _normalised(items: Sequence[Item], attr: str) -> dict[str, dict[int, float]]:
    """Per group: loss / (sum over the group's layers of the loss at each layer's lowest candidate)."""
    totals: dict[str, float] = {}
    for it in items:
        losses = getattr(it, attr)
        if losses:
            totals[it.group] = totals.get(it.group, 0.0) + losses[min(losses)]
    out = {}
    for it in items:
        t = totals.get(it.group, 0.0)
        out[it.name] = {b: (v / t if t > 0 else 0.0) for b, v in getattr(it, attr).items()}
    return out


def min_feasible(items: Sequence[Item], attr: str) -> float:
    """Smallest reachable size-weighted average bits (every layer at its lowest candidate)."""
    size = "params" if attr == "w_loss" else "act_numel"
    cost = storage_bits if attr == "w_loss" else (lambda b: b)
    total = sum(getattr(it, size) for it in items)
    low = sum(getattr(it, size) * cost(min(getattr(it, attr))) for it in items)
    return low / total if total else 0.0


def _solve_kind(
    items: Sequence[Item], attr: str, budget: float, weights: Mapping[str, float], joint: bool, what: str
) -> tuple[dict[str, int], float, str]:
    """Solve the weight (``w_loss``) or activation (``a_loss``) program; returns choice, objective, status."""
    size = "params" if attr == "w_loss" else "act_numel"
    cost = storage_bits if attr == "w_loss" else (lambda b: b)
    groups = sorted({it.group for it in items}) if not joint else ["*"]
    for g in groups:
        sub = [it for it in items if joint or it.group == g]
        low = min_feasible(sub, attr)
        if low > budget + 1e-9:
            scope = "" if joint else f" for the {g} group (separate-groups mode)"
            raise QdiffError(
                f"allocation.{what} = {budget:g} bits is infeasible{scope}: the smallest feasible budget is "
                f"{math.ceil(low * 1e4) / 1e4:.4f} bits (every layer at its lowest candidate)"
            )
    with warnings.catch_warnings():  # pulp >= 3.3 deprecates the 2.x API that pyproject's pulp>=2.8 still needs
        warnings.simplefilter("ignore", DeprecationWarning)
        return _build_and_solve(items, attr, budget, weights, groups, joint, size, cost, what)


def _build_and_solve(items, attr, budget, weights, groups, joint, size, cost, what):
    norm = _normalised(items, attr)
    prob = pulp.LpProblem(f"qdiff_{attr}", pulp.LpMinimize)
    x: dict[tuple[str, int], pulp.LpVariable] = {}
    for k, it in enumerate(items):
        for b in sorted(getattr(it, attr)):
            x[it.name, b] = pulp.LpVariable(f"x_{k}_{b}", cat=pulp.LpBinary)
    objective = []
    for it in items:
        w = weights.get(it.group, 1.0)
        objective += [(x[it.name, b], w * loss) for b, loss in norm[it.name].items()]
    prob += pulp.LpAffineExpression(objective)
    for it in items:
        prob += pulp.lpSum(x[it.name, b] for b in getattr(it, attr)) == 1
    for g in groups:
        sub = [it for it in items if joint or it.group == g]
        total = sum(getattr(it, size) for it in sub)
        terms = [(x[it.name, b], getattr(it, size) * cost(b)) for it in sub for b in getattr(it, attr)]
        prob += pulp.LpAffineExpression(terms) <= budget * total + 1e-6 * total
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    label = pulp.LpStatus[status]
    if label != "Optimal":
        raise QdiffError(f"allocation.{what}: the solver returned {label!r}")
    choice = {}
    for it in items:
        chosen = [b for b in getattr(it, attr) if (x[it.name, b].value() or 0.0) > 0.5]
        choice[it.name] = chosen[0]
    obj = sum(weights.get(it.group, 1.0) * norm[it.name][choice[it.name]] for it in items)
    return choice, obj, label


def average_bits(items: Sequence[Item], choice: Mapping[str, int], attr: str) -> float:
    """Size-weighted average of the chosen bits (storage bits for weights)."""
    size = "params" if attr == "w_loss" else "act_numel"
    cost = storage_bits if attr == "w_loss" else (lambda b: b)
    total = sum(getattr(it, size) for it in items)
    return sum(getattr(it, size) * cost(choice[it.name]) for it in items) / total if total else 0.0


def allocate(
    items: Sequence[Item], w_budget: float, a_budget: float, *, joint: bool = True, content_weight: float = 0.5
) -> Plan:
    """Solve both programs and return a :class:`Plan` (``a_bits=None`` where activations stay FP).

    Raises :class:`QdiffError` naming the smallest feasible budget when a budget cannot be met.
    """
    if not items:
        raise QdiffError("allocation: no layers to allocate (all protected or skipped?)")
    t0 = time.perf_counter()
    weights = {"content": content_weight, "quality": 1.0 - content_weight} if joint else {}
    w_choice, w_obj, w_status = _solve_kind(items, "w_loss", w_budget, weights, joint, "w_budget")
    a_items = [it for it in items if it.a_loss]
    a_choice, a_obj, a_status = ({}, 0.0, "Optimal")
    if a_items:
        a_choice, a_obj, a_status = _solve_kind(a_items, "a_loss", a_budget, weights, joint, "a_budget")
    layers = {}
    for it in items:
        a = a_choice.get(it.name, FLOAT_ACT_BITS)
        layers[it.name] = LayerBits(w_choice[it.name], None if a == FLOAT_ACT_BITS else a)
    nominal = sum(it.params * w_choice[it.name] for it in items) / sum(it.params for it in items)
    meta = {
        "allocator": "ilp-cbc",
        "joint": joint,
        "content_weight": content_weight if joint else None,
        "w_budget": w_budget,
        "a_budget": a_budget,
        "achieved_w_bits": average_bits(items, w_choice, "w_loss"),  # storage bits (3 -> 4)
        "achieved_w_bits_nominal": nominal,
        "achieved_a_bits": average_bits(a_items, a_choice, "a_loss") if a_items else float(FLOAT_ACT_BITS),
        "objective_w": w_obj,
        "objective_a": a_obj,
        "solver_status": {"weights": w_status, "activations": a_status},
        "solve_s": round(time.perf_counter() - t0, 3),
        "layers": len(items),
    }
    return Plan(layers, meta)


def measured_weight_bits(denoiser) -> dict[str, float]:
    """Average weight bits of a quantized denoiser measured from its real buffers, weighted by parameter count.

    ``storage_bits`` = 8 * bytes of every ``qweight`` / number of weights (what the allocator's budget counts);
    ``with_scales_bits`` adds the fp32 ``w_scale`` buffers. Both computed from tensors, never from bit-widths.
    """
    from qdiff.quant.transform import quantized_layers

    numel = qbytes = sbytes = 0
    for m in quantized_layers(denoiser).values():
        if m.state != "frozen":
            raise ValueError("measured_weight_bits needs frozen layers (after qdiff.quantize)")
        n = 1
        for d in m.weight_shape:
            n *= d
        numel += n
        qbytes += m.qweight.numel() * m.qweight.element_size()
        sbytes += m.w_scale.numel() * m.w_scale.element_size()
    if not numel:
        raise ValueError("no quantized layers")
    return {"storage_bits": 8.0 * qbytes / numel, "with_scales_bits": 8.0 * (qbytes + sbytes) / numel, "params": numel}
