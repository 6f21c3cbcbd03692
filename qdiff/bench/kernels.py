"""``qdiff bench kernels``: W8A8 / W4A8 GEMM timings against bf16 cuBLAS, ``torch._int_mm`` and fp8.

On a GPU the shapes are the issue's SDXL-like and FLUX-like layers (M = 4096 tokens). Without one, the
Triton kernels run in the CPU interpreter at reduced sizes: the table then checks exactness only, and its
header says so. Every qdiff row is also checked: its raw int32 accumulator must equal an exact integer
matmul of the same codes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qdiff.bench.report import Machine, command_line, machine, markdown_table, time_us
from qdiff.errors import QdiffError

BASELINES = ("bf16 torch.mm", "torch._int_mm", "fp8 torch._scaled_mm")


@dataclass(frozen=True)
class Shape:
    name: str
    m: int
    k: int
    n: int


GPU_SHAPES = (
    Shape("SDXL attn 640", 4096, 640, 640),
    Shape("SDXL attn 1280", 4096, 1280, 1280),
    Shape("SDXL FF 1280->5120", 4096, 1280, 5120),
    Shape("FLUX attn 3072", 4096, 3072, 3072),
    Shape("FLUX FF 3072->12288", 4096, 3072, 12288),
)
# Interpreter: the same layer kinds at ~1/10 of K and N and 1/16 of M (run time, not speed, limits them).
CPU_SHAPES = (
    Shape("SDXL attn 640 /10", 256, 64, 64),
    Shape("SDXL attn 1280 /10", 256, 128, 128),
    Shape("SDXL FF 1280->5120 /10", 256, 128, 512),
    Shape("FLUX attn 3072 /10", 256, 320, 320),
    Shape("FLUX FF 3072->12288 /10", 256, 320, 1280),
)


@dataclass(frozen=True)
class Operands:
    x: torch.Tensor  # (M, K) bf16 activations
    w: torch.Tensor  # (N, K) bf16 weights
    qa: torch.Tensor  # (M, K) int8
    sa: torch.Tensor  # (M,) fp32
    qw8: torch.Tensor  # (N, K) int8
    qw4: torch.Tensor  # (N, ceil(K/2)) uint8, codes in [-7, 7]
    codes4: torch.Tensor  # (N, K) int8 (unpacked, for the check)
    sw: torch.Tensor  # (N, 1) fp32


def _operands(s: Shape, dev: torch.device, gen: torch.Generator) -> Operands:
    from qdiff.numerics.primitives import pack_int4

    x = torch.randn(s.m, s.k, generator=gen).to(dev, torch.bfloat16)
    w = (torch.randn(s.n, s.k, generator=gen) * 0.05).to(dev, torch.bfloat16)
    qa = torch.randint(-127, 128, (s.m, s.k), generator=gen, dtype=torch.int8).to(dev)
    qw8 = torch.randint(-127, 128, (s.n, s.k), generator=gen, dtype=torch.int8).to(dev)
    codes4 = torch.randint(-7, 8, (s.n, s.k), generator=gen, dtype=torch.int8)
    sa = (torch.rand(s.m, generator=gen) * 0.01 + 1e-3).to(dev)
    sw = (torch.rand(s.n, 1, generator=gen) * 0.01 + 1e-3).to(dev)
    return Operands(x, w, qa, sa, qw8, pack_int4(codes4).to(dev), codes4.to(dev), sw)


def _exact_int(qa: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    if qa.is_cuda:
        return torch._int_mm(qa, qw.t())
    return (qa.double() @ qw.double().t()).to(torch.int32)


def _candidates(o: Operands, s: Shape, mach: Machine) -> dict[str, tuple]:
    """name -> (callable, check or None); checks return True when the int32 accumulator is exact."""
    from qdiff._kernels.act_quant import quantize_dynamic
    from qdiff._kernels.gemm import gemm

    bf16 = torch.bfloat16
    wt = o.w.t()
    cands: dict[str, tuple] = {"bf16 torch.mm": (lambda: torch.mm(o.x, wt), None)}
    try:
        torch._int_mm(o.qa, o.qw8.t())
        cands["torch._int_mm"] = (lambda: torch._int_mm(o.qa, o.qw8.t()), None)
    except RuntimeError:
        pass
    if mach.fp8:
        a8 = o.x.to(torch.float8_e4m3fn)
        b8 = o.w.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=o.x.device)
        cands["fp8 torch._scaled_mm"] = (lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=bf16), None)
    k = s.k
    g8 = lambda: gemm(o.qa, o.qw8, o.sa, o.sw, k=k, w_bits=8, out_dtype=bf16)  # noqa: E731
    raw8 = lambda: gemm(o.qa, o.qw8, o.sa, o.sw, k=k, w_bits=8, raw_acc=True)  # noqa: E731
    cands["qdiff W8A8 GEMM"] = (g8, lambda: torch.equal(raw8(), _exact_int(o.qa, o.qw8)))

    def act_then_gemm():  # what a dynamic W8A8 layer runs: per-token quantization, then the GEMM
        qa, sa = quantize_dynamic(o.x)
        return gemm(qa, o.qw8, sa, o.sw, k=k, w_bits=8, out_dtype=bf16)

    cands["qdiff W8A8 act-quant + GEMM"] = (act_then_gemm, None)
    for gs in (None, 128, 64):
        scale = o.sw if gs is None else o.sw.expand(s.n, -(-s.k // gs)).contiguous()
        label = "per-channel" if gs is None else f"g={gs}"

        def run(gs=gs, scale=scale):
            return gemm(o.qa, o.qw4, o.sa, scale, k=k, w_bits=4, group_size=gs, out_dtype=bf16)

        def check(gs=gs, scale=scale):
            raw = gemm(o.qa, o.qw4, o.sa, scale, k=k, w_bits=4, group_size=gs, raw_acc=True)
            return torch.equal(raw, _exact_int(o.qa, o.codes4))

        cands[f"qdiff W4A8 GEMM {label}"] = (run, check)
    return cands


def run_kernel_bench(
    device: str = "auto", reps: int | None = None, sweep: bool = False, shapes: tuple[Shape, ...] | None = None
) -> str:
    """Time every candidate on every shape (default: the issue's shapes on GPU); returns the Markdown report."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu"))
    if dev.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel import
    elif not torch.cuda.is_available():
        raise QdiffError(f"--device {device}: CUDA is not available on this machine")
    if sweep and dev.type != "cuda":
        raise QdiffError("--sweep times tile configurations and needs a GPU")
    mach = machine(dev)
    shapes = shapes or (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES)
    reps = reps or (50 if dev.type == "cuda" else 2)
    gen = torch.Generator().manual_seed(0)
    rows = [row for s in shapes for row in _bench_shape(s, dev, gen, mach, reps)]
    cols = ["shape", "MxKxN", "implementation", "µs", "TOPS", "% int8 peak", "vs bf16 mm", "vs _int_mm", "vs fp8",
            "int32 acc"]  # fmt: skip
    parts = [
        "## Kernels: `qdiff bench kernels`",
        mach.header(),
        f"- command: `{command_line()}`; median of {reps} runs; outputs bf16; W4A8 codes in [-7, 7]",
        "",
        markdown_table(cols, rows),
    ]
    if sweep:
        parts += ["", _sweep(shapes, dev, gen)]
    return "\n".join(parts) + "\n"


def _bench_shape(s: Shape, dev: torch.device, gen: torch.Generator, mach: Machine, reps: int) -> list[list[str]]:
    o = _operands(s, dev, gen)
    timings: dict[str, float] = {}
    rows = []
    for name, (fn, check) in _candidates(o, s, mach).items():
        t = timings[name] = time_us(fn, dev, reps, warmup=1 if dev.type == "cpu" else 10)
        tops = 2 * s.m * s.n * s.k / (t * 1e-6) / 1e12
        peak = f"{100 * tops / mach.int8_peak_tops:.1f}" if mach.int8_peak_tops else "n/a"
        ok = "" if check is None else ("exact" if check() else "MISMATCH")
        vs = [f"{timings[b] / t:.2f}x" if b in timings else "n/a" for b in BASELINES]
        if mach.interpreter:  # interpreter time is not kernel speed: no rates or ratios
            tops_s, peak, vs = "—", "—", ["—"] * len(BASELINES)
        else:
            tops_s = f"{tops:.3g}"
        rows.append([s.name, f"{s.m}x{s.k}x{s.n}", name, f"{t:.1f}", tops_s, peak, *vs, ok])
    return rows


def _sweep(shapes, dev: torch.device, gen: torch.Generator) -> str:
    """Every GPU tile candidate for W8A8 and W4A8 (per-channel) per shape; the 3 fastest are listed."""
    from qdiff._kernels.tiles import GPU_SWEEP

    rows = []
    for s in shapes:
        o = _operands(s, dev, gen)
        for label in ("W8A8", "W4A8"):
            res = sorted(((_time_tile(label, o, s, t, dev), t) for t in GPU_SWEEP), key=lambda r: r[0])
            for us, t in res[:3]:
                tile = f"{t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}"
                rows.append([s.name, label, tile, f"{us:.1f}"])
    return "### Tile sweep (3 fastest per shape)\n\n" + markdown_table(["shape", "kernel", "tile", "µs"], rows)


def _time_tile(label: str, o: Operands, s: Shape, tile, dev: torch.device) -> float:
    from qdiff._kernels.gemm import gemm

    qw, bits = (o.qw8, 8) if label == "W8A8" else (o.qw4, 4)
    return time_us(lambda: gemm(o.qa, qw, o.sa, o.sw, k=s.k, w_bits=bits, tile=tile), dev, 20, warmup=3)
