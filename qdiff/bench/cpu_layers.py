"""Per-layer CPU timings: fp32 / bf16 ``nn.Linear`` / ``nn.Conv2d`` against the frozen qdiff layers users run.

Each quantized variant is a real :class:`~qdiff.quant.modules.QuantLinear` / ``QuantConv2d`` (``quant_module_for``
+ ``freeze``) with its kernel preference set, so dispatch, activation quantization and the epilogue are timed with
the GEMM. The reference row is the W8A8 dynamic layer on the exact torch backend; every int8 output is compared
with ``torch.equal`` to the same layer on the reference, and the spy names the backend each row ran on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qdiff.bench.cpu import INT8, REF, Target, best_of_rounds, ran_on, spied
from qdiff.bench.report import markdown_table
from qdiff.config.layer import LayerQuant
from qdiff.numerics.primitives import compute_qparams
from qdiff.quant.modules import QuantLayer, QuantLinear, quant_module_for

# M x K x N of the issue (M = tokens of a 32x32 latent); the conv is SDXL's 320-channel 3x3 at 64x64 (M=4096)
LINEAR_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1024, 128, 128), (1024, 320, 1280), (1024, 640, 640), (1024, 1280, 1280), (1024, 1280, 5120),
    (1024, 5120, 1280), (1024, 3072, 3072),
)  # fmt: skip
CONV = (1, 320, 64, 64)  # B, C (= N), H, W; 3x3, padding 1
QUICK_LINEAR = ((1024, 128, 128),)
QUICK_CONV = (1, 32, 16, 16)
GROUP = 64
TARGET_SHAPE = (1024, 1280, 5120)

W8A8_DYN = LayerQuant(w_bits=8, a_bits=8, a_mode="dynamic")
W8A8_STATIC = LayerQuant(w_bits=8, a_bits=8, a_mode="static")
W4A8_G64 = LayerQuant(w_bits=4, granularity="group", group_size=GROUP, a_bits=8, a_mode="dynamic")
# variant label -> (scheme, kernel preference); the first is the reference row
QUANT_VARIANTS: tuple[tuple[str, LayerQuant, str], ...] = (
    ("W8A8 dynamic", W8A8_DYN, REF),
    ("W8A8 dynamic", W8A8_DYN, INT8),
    ("W8A8 static", W8A8_STATIC, INT8),
    ("W4A8 g64", W4A8_G64, INT8),
)


@dataclass(frozen=True)
class LayerRow:
    layer: str
    variant: str
    backend: str  # what the spy saw ("float" for the float rows)
    seconds: float
    exact: str  # "= reference" / "DIFFERS" / "" (float and reference rows)


def _frozen(layer: nn.Module, q: LayerQuant, x: Tensor) -> QuantLayer:
    """The float layer wrapped and frozen (static: a per-tensor range from ``x``'s min and max)."""
    m = quant_module_for(layer, q)
    if q.static_act:
        m.set_act_qparams(*compute_qparams(x.amin(), x.amax(), q.a_bits, symmetric=False))
    m.freeze()
    return m


@dataclass(frozen=True)
class Variant:
    """One timed callable; ``module``: the frozen layer it runs (or, for ``direct``, whose codes it uses)."""

    call: Callable[[], Tensor]
    module: QuantLayer | None = None
    direct: bool = False  # cpu_int8's kernels called directly, not through the module (not what users run)


def _variants(layer: nn.Module, x: Tensor, schemes, use_int8: bool) -> dict[str, Variant]:
    """label -> variant; the float layer's weights are left untouched."""
    xb = x.bfloat16()
    layer_b = copy.deepcopy(layer).to(torch.bfloat16)
    out = {"fp32": Variant(lambda: layer(x)), "bf16": Variant(lambda: layer_b(xb))}
    for label, q, kernel in schemes:
        if kernel == INT8 and not use_int8:
            continue
        m = _frozen(copy.deepcopy(layer), q, x)
        m.kernel = kernel
        out[f"{label} ({kernel})"] = Variant(lambda m=m: m(x), m)
        if kernel == INT8 and q.group_size and isinstance(m, QuantLinear):
            out[f"{label}, int4 resident: unpack per call"] = Variant(_unpack_per_call(m, x), m, direct=True)
    return out


def _unpack_per_call(m: QuantLayer, x: Tensor) -> Callable[[], Tensor]:
    """The other W4A8 layout: only the packed int4 bytes stay resident; unpack + prepack on every call."""
    from qdiff.backends import cpu_int8 as ci

    pw = m.packed_weight()
    return lambda: ci.linear_packed(x, ci.prepack_linear(pw.unpack(), pw.scale, pw.group_size), m.bias)


def _measure(name: str, layer: nn.Module, x: Tensor, schemes, rounds: int, budget_s: float, use_int8: bool):
    variants = _variants(layer, x, schemes, use_int8)
    backends: dict[str, str] = {}
    exact: dict[str, str] = {}
    with torch.inference_mode():
        for label, v in variants.items():
            y, counts = spied(v.call)  # the warm-up call: oneDNN kernel generation, prepacking, first-touch pages
            backends[label] = f"{INT8} kernels, direct" if v.direct else ran_on(counts)
            if v.module is not None and v.module.kernel == INT8:
                v.module.kernel = REF
                want = v.module(x)
                v.module.kernel = INT8
                exact[label] = "= reference" if torch.equal(y, want) else "**DIFFERS**"
        slow = {label: 2 for label in variants if label.endswith(f"({REF})") or variants[label].direct}
        best, r = best_of_rounds({k: v.call for k, v in variants.items()}, rounds, budget_s=budget_s, capped=slow)
        sizes = _sizes(name, variants)
    rows = [LayerRow(name, label, backends[label], best[label], exact.get(label, "")) for label in variants]
    return rows, r, sizes


def _sizes(name: str, variants: dict[str, Variant]) -> list[str] | None:
    """Stored bytes (codes + scales) and what the W8A8 and W4A8 layers hold after running on cpu_int8 (KiB)."""
    cells = []
    for label in (f"W8A8 dynamic ({INT8})", f"W4A8 g64 ({INT8})"):
        if label not in variants:
            return None
        m = variants[label].module
        stored = m.qweight.nbytes + m.w_scale.nbytes  # a released layer's placeholder keeps the stored shape
        held = m.nbytes() - (m.bias.nbytes if m.bias is not None else 0)
        cells += [f"{stored / 1024:,.0f}", f"{held / 1024:,.0f}"]
    return [name, *cells]


def _linear(m: int, k: int, n: int, gen: torch.Generator) -> tuple[nn.Linear, Tensor]:
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return lin, torch.randn(m, k, generator=gen)


def _conv(b: int, c: int, h: int, w: int, gen: torch.Generator) -> tuple[nn.Conv2d, Tensor]:
    conv = nn.Conv2d(c, c, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5)
        conv.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return conv, torch.randn(b, c, h, w, generator=gen)


def layer_section(rounds: int, quick: bool, use_int8: bool) -> tuple[str, list[Target]]:
    """Markdown section and the per-layer target (W8A8 at 1024x1280x5120 vs fp32 and bf16)."""
    gen = torch.Generator().manual_seed(0)
    budget = 0.0 if quick else 3.0
    rows: list[LayerRow] = []
    rounds_run: list[int] = []
    sizes: list[list[str]] = []
    for m, k, n in QUICK_LINEAR if quick else LINEAR_SHAPES:
        lin, x = _linear(m, k, n, gen)
        found, r, size = _measure(f"{m}×{k}×{n}", lin, x, QUANT_VARIANTS, rounds, budget, use_int8)
        rows += found
        rounds_run.append(r)
        sizes += [size] if size else []
    b, c, h, w = QUICK_CONV if quick else CONV
    conv, x = _conv(b, c, h, w, gen)
    convs = (*QUANT_VARIANTS, ("W4A8 g64", W4A8_G64, REF))  # group-wise conv: cpu_int8's im2col vs the reference
    found, r, _ = _measure(f"conv3×3 {b}×{c}×{h}×{w}→{c} (M={b * h * w}, K={9 * c})", conv, x, convs, rounds, budget,
                        use_int8)  # fmt: skip
    rows += found
    rounds_run.append(r)
    text = _render(rows, min(rounds_run), max(rounds_run))
    if sizes:
        cols = ["Linear M×K×N", "W8A8 stored KiB", "resident KiB", "W4A8 g64 stored (int4) KiB", "resident KiB"]
        text += (
            "\n\nWeight bytes of the Linear layers above: stored = the module's codes and scales (what an export "
            "holds); resident = what the layer holds after its first call on cpu_int8 (`QuantLayer.nbytes()`, bias "
            "left out): the prepacked int8 copy, which replaced its own codes, and the scales. The unpack-per-call "
            "row above times the alternative W4A8 layout, with only the int4 bytes resident.\n\n"
            + markdown_table(cols, sizes)
        )
    return text, _targets(rows)


def _render(rows: list[LayerRow], r_min: int, r_max: int) -> str:
    base = {(r.layer, r.variant): r.seconds for r in rows}
    table = []
    for r in rows:
        fp32, bf16 = base[(r.layer, "fp32")], base[(r.layer, "bf16")]
        table.append([r.layer, r.variant, r.backend, f"{r.seconds * 1e3:.3f}", f"{fp32 / r.seconds:.2f}x",
                      f"{bf16 / r.seconds:.2f}x", r.exact])  # fmt: skip
    cols = ["layer M×K×N", "variant", "ran on (spy)", "ms", "vs fp32", "vs bf16", "int8 output"]
    intro = (
        "### Per layer\n\n"
        f"Frozen qdiff layers (`quant_module_for` + `freeze`, kernel preference in brackets) against `nn.Linear` / "
        f"`nn.Conv2d` in fp32 and bf16; fp32 inputs, bias on. Best of {r_min}-{r_max} interleaved rounds per layer "
        "(the reference and unpack-per-call rows: of 2). W8A8: int8 per-channel weights; dynamic = int8 symmetric "
        "per-token activations, static = asymmetric per-tensor; W4A8 g64: int4 group-wise weights (group 64), "
        "dynamic int8 activations. "
        "`= reference`: the output is `torch.equal` to the same layer on the torch reference backend."
    )
    return intro + "\n\n" + markdown_table(cols, table)


def _targets(rows: list[LayerRow]) -> list[Target]:
    m, k, n = TARGET_SHAPE
    name = f"{m}×{k}×{n}"
    t = {r.variant: r.seconds for r in rows if r.layer == name}
    w8 = t.get(f"W8A8 dynamic ({INT8})")
    what = f"per layer {name}: W8A8 dynamic speed-up"
    return [
        Target(f"{what} vs fp32", t["fp32"] / w8 if w8 else None, 3.0, at_most=False),
        Target(f"{what} vs bf16", t["bf16"] / w8 if w8 else None, 1.5, at_most=False),
    ] if t else []  # fmt: skip
