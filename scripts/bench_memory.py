"""Peak memory of streaming quantization and mapped loading on real-size checkpoints (issue #11).

    python scripts/bench_memory.py --write docs/benchmarks.md --results /tmp/mem.json
    python scripts/bench_memory.py --skip-flux            # SDXL rows only
    python scripts/bench_memory.py --render /tmp/mem.json --write docs/benchmarks.md   # re-render, no measuring

Every run is a fresh Python SUBPROCESS; its peak RSS is the kernel's ``ru_maxrss`` of that child (``os.wait4``),
so imports, the interpreter and every transient count. While a child runs, the parent watches ``MemAvailable`` and
kills it when the machine has under 3 GiB left (the machine is shared); FLUX rows start only with >= 14 GiB
available. Inputs are the random-weight real-size fixtures of ``scripts/make_real_checkpoint.py``
(``/work/scratch/sdxl-real``: SDXL UNet fp16, ``/work/scratch/flux-real``: FLUX.1-schnell transformer bf16);
exports go to ``--scratch`` and are deleted after their rows are measured.

Rows: SDXL streaming W8A8 and W4A8 (targets 3.5 / 2.5 GiB), SDXL in-memory W8A8 in fp16 for comparison (when
>= 12 GiB are available), loading the SDXL W8A8 export + one UNet call (batch 1, 32x32 latent; target: resident
model bytes + 1 GiB), FLUX W4A8 streaming (target 10 GiB; its in-memory run needs the 23.8 GB bf16 model resident,
so it is not run) and loading it + one transformer call (16x16 latent tokens, 8 text tokens).

W4A8 here is the bundled ``w4a8`` recipe (int4 group-64 weights, int8 dynamic per-token activations) with min-max
weight ranges: its MSE clip search costs ~200x the time of min-max on 2 cores (~2.3 h for SDXL, ~10 h for FLUX)
and holds the same one layer at a time (its temporaries are chunked to 16 MiB), so it changes time, not memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
SECTION = "## Memory: streaming quantization"


# --- child jobs (run in a fresh process) ----------------------------------------------------------------------------


def _recipe(name: str):
    from qdiff.config.recipe import Recipe

    if name == "w4a8-minmax":
        data = Recipe.load("w4a8").to_dict()
        data["weights"]["method"] = "minmax"
        data["name"] = name
        return Recipe.from_dict(data)
    return Recipe.load(name)


def _resident(module) -> int:
    """Bytes the module holds: its tensors, each storage once, with cpu_int8's prepacked copy in place of a layer's
    released codes (``qdiff.eval.size.resident_bytes``)."""
    from qdiff.eval.size import resident_bytes

    return resident_bytes(module).in_memory


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child_stream(src: str, recipe: str, out: str) -> dict:
    from qdiff.export.stream import stream_quantize

    start = time.perf_counter()
    stream_quantize(src, _recipe(recipe), out, progress=False)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {"wall_s": time.perf_counter() - start, "out_bytes": size}


def child_memory(src: str, recipe: str, out: str) -> dict:
    """The in-memory path on the same checkpoint: the whole UNet loaded in its fp16, quantized in place, saved."""
    from types import SimpleNamespace

    import torch
    from diffusers import UNet2DConditionModel

    import qdiff
    from qdiff.export.save import write_state_dict

    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=torch.float16)
    pipe = SimpleNamespace(unet=unet, name_or_path=src, config={}, scheduler=None)  # quantize needs only the denoiser
    qdiff.quantize(pipe, _recipe(recipe), progress=False)
    Path(out).mkdir(parents=True)
    write_state_dict(unet.state_dict(), Path(out))
    return {"wall_s": time.perf_counter() - start}


def child_load(export: str, family: str, kernel: str = "auto") -> dict:
    import diffusers
    import torch
    from accelerate import init_empty_weights  # noqa: F401 (imported before the baseline is taken)

    from qdiff.export.load import load_denoiser_export

    getattr(diffusers, json.loads((Path(export) / "qdiff.json").read_text())["denoiser"]["class"])  # its imports
    torch.manual_seed(0)
    rss_base, start = _rss_now(), time.perf_counter()
    den = load_denoiser_export(export, device="cpu", kernel=kernel)
    load_s, rss_loaded = time.perf_counter() - start, _rss_now()
    if family == "sdxl":  # batch 1, 32x32 latent (256 px), 77 text tokens
        kwargs = dict(sample=torch.randn(1, 4, 32, 32, dtype=torch.float16), timestep=torch.tensor([500]),
                      encoder_hidden_states=torch.randn(1, 77, 2048, dtype=torch.float16),
                      added_cond_kwargs={"text_embeds": torch.randn(1, 1280, dtype=torch.float16),
                                         "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]]).half()})  # fmt: skip
    else:  # FLUX: 16x16 latent tokens (256), 8 text tokens
        kwargs = dict(hidden_states=torch.randn(1, 256, 64, dtype=torch.bfloat16),
                      encoder_hidden_states=torch.randn(1, 8, 4096, dtype=torch.bfloat16),
                      pooled_projections=torch.randn(1, 768, dtype=torch.bfloat16), timestep=torch.tensor([1.0]),
                      img_ids=torch.zeros(256, 3), txt_ids=torch.zeros(8, 3))  # fmt: skip
    start = time.perf_counter()
    with torch.no_grad():
        out = den(**kwargs, return_dict=False)[0]
    return {"load_s": load_s, "call_s": time.perf_counter() - start, "resident_bytes": _resident(den),
            "rss_base": rss_base, "rss_after_load": rss_loaded, "finite": bool(torch.isfinite(out).all())}  # fmt: skip


CHILDREN = {"stream": child_stream, "memory": child_memory, "load": child_load}


# --- parent: one subprocess per row, peak RSS from wait4 ------------------------------------------------------------


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def watch(proc: subprocess.Popen, floor: int = 3 * GIB, poll: float = 0.5) -> tuple[int, int, bool]:
    """Wait for ``proc``: (exit code, peak RSS bytes = the child's ``ru_maxrss``, killed). The child is killed when
    the machine drops under ``floor`` bytes available (it is shared: never push it into the OOM killer)."""
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, killed
        if mem_available() < floor and not killed:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(poll)


def run_child(job: str, *args: str, floor: int = 3 * GIB) -> dict:
    """Run one job in a fresh interpreter; returns its JSON result plus ``peak_rss`` (bytes, ru_maxrss)."""
    cmd = [sys.executable, __file__, "--child", job, *args]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    proc.returncode, peak_rss, killed = watch(proc, floor)
    lines = proc.stdout.read().strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
    result.update(peak_rss=peak_rss, returncode=proc.returncode, killed=killed)
    print("  ->", json.dumps(result), flush=True)
    return result


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """Run every row's subprocess; returns row key -> the child's result (``peak_rss``, times, sizes)."""
    scratch, results = Path(args.scratch), {}
    sdxl_out = scratch / "bench-sdxl-w8a8"
    for recipe in ("w8a8", "w4a8-minmax"):
        out = scratch / f"bench-sdxl-{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        results[f"sdxl-stream-{recipe}"] = run_child("stream", args.sdxl, recipe, str(out))
        if out != sdxl_out:
            shutil.rmtree(out, ignore_errors=True)
    if not args.skip_in_memory and mem_available() >= 12 * GIB:
        out = scratch / "bench-sdxl-memory"
        shutil.rmtree(out, ignore_errors=True)
        results["sdxl-memory-w8a8"] = run_child("memory", args.sdxl, "w8a8", str(out))
        shutil.rmtree(out, ignore_errors=True)
    results["sdxl-load-w8a8"] = run_child("load", str(sdxl_out), "sdxl")  # auto: cpu_int8 where its gate passes
    results["sdxl-load-w8a8-torch"] = run_child("load", str(sdxl_out), "sdxl", "torch")
    shutil.rmtree(sdxl_out, ignore_errors=True)
    if args.skip_flux:
        return results
    if mem_available() < 14 * GIB:
        results["flux-skipped"] = {"available": mem_available()}
        return results
    flux_out = scratch / "bench-flux-w4a8"
    shutil.rmtree(flux_out, ignore_errors=True)
    results["flux-stream-w4a8-minmax"] = run_child("stream", args.flux, "w4a8-minmax", str(flux_out))
    if results["flux-stream-w4a8-minmax"]["returncode"] == 0 and mem_available() >= 14 * GIB:
        results["flux-load-w4a8-minmax"] = run_child("load", str(flux_out), "flux")
    shutil.rmtree(flux_out, ignore_errors=True)
    return results


def _load_notes(res: dict) -> str:
    """Where a load row's peak goes: the process before loading, what loading adds, what the call adds."""
    loaded = res["rss_after_load"] - res["rss_base"] - res["resident_bytes"]
    call = res["peak_rss"] - res["rss_after_load"]
    return (
        f"resident {_gib(res['resident_bytes'])}; RSS {_gib(res['rss_base'])} before loading (interpreter, torch, "
        f"diffusers); loading adds resident {loaded / GIB:+.2f} GiB, the call +{_gib(call)}; "
        f"load {res['load_s']:.0f} s, call {res['call_s']:.0f} s"
    )


def table(results: dict[str, dict]) -> list[list[str]]:
    """Markdown rows (run, recipe, peak RSS, target, wall, notes) from :func:`measure`'s results."""
    rows = []

    def row(key, what, recipe, target, notes=lambda r: ""):
        res = results.get(key)
        if res is None:
            return
        if res.get("returncode", 1) != 0:
            failed = "killed (machine memory low)" if res.get("killed") else "failed"
            rows.append([what, recipe, failed, target, "", ""])
            return
        wall = res.get("wall_s", res.get("load_s", 0) + res.get("call_s", 0))
        rows.append([what, recipe, _gib(res["peak_rss"]), target, f"{wall:.0f} s", notes(res)])

    export = lambda r: f"export {_gib(r['out_bytes'])}"  # noqa: E731
    row("sdxl-stream-w8a8", "SDXL UNet: streaming quantize", "w8a8", "<= 3.5 GiB", export)
    row("sdxl-stream-w4a8-minmax", "SDXL UNet: streaming quantize", "w4a8-minmax", "<= 2.5 GiB", export)
    row("sdxl-memory-w8a8", "SDXL UNet: in-memory quantize (loaded in fp16), comparison", "w8a8", "-")
    load = results.get("sdxl-load-w8a8", {})
    target = f"<= {_gib(load['resident_bytes'] + GIB)} (resident + 1 GiB)" if "resident_bytes" in load else ""
    row("sdxl-load-w8a8", "SDXL W8A8 export: load + one UNet call (1x4x32x32), kernel auto (cpu_int8)", "w8a8", target,
        lambda r: _load_notes(r) + "; each layer's prepacked copy replaces its codes on the first call")  # fmt: skip
    row("sdxl-load-w8a8-torch", "SDXL W8A8 export: load + one UNet call, `qdiff.load(..., kernel=\"torch\")`", "w8a8",
        target, _load_notes)  # fmt: skip
    if "flux-skipped" in results:
        available = _gib(results["flux-skipped"]["available"])
        rows.append(["FLUX rows", "", f"not run: {available} available (< 14 GiB)", "", "", ""])
    row("flux-stream-w4a8-minmax", "FLUX.1-schnell transformer: streaming quantize", "w4a8-minmax", "<= 10 GiB",
        lambda r: export(r) + "; in-memory not run (the 23.8 GB bf16 model does not fit)")  # fmt: skip
    row("flux-load-w4a8-minmax", "FLUX W4A8 export: load + one transformer call (256 img + 8 txt tokens)",
        "w4a8-minmax", "runs", lambda r: _load_notes(r) + f"; output finite: {r['finite']}")  # fmt: skip
    return rows


def render(rows: list[list[str]], command: str) -> str:
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    total = _gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    head = ["run", "recipe", "peak RSS", "target", "wall", "notes"]
    lines = [
        SECTION, "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {total} RAM (shared with other jobs), no GPU; "
        f"torch {torch.__version__}, Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}. "
        f"Command: `{command}`.",
        "",
        "Peak RSS is the kernel's `ru_maxrss` of a fresh subprocess per row (interpreter and imports included). "
        "Inputs: random-weight real-size checkpoints from `scripts/make_real_checkpoint.py` (SDXL UNet 2.57 B params "
        "fp16, 5.1 GB; FLUX.1-schnell transformer 11.9 B params bf16, 23.8 GB). `w4a8-minmax` = the bundled `w4a8` "
        "(int4 group-64 weights, int8 dynamic activations) with min-max weight ranges: its MSE range search costs "
        "~200x the time on 2 cores and holds the same one layer (chunked temporaries): it changes time, not memory.",
        "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "Wall times are from a 2-core machine shared with other jobs and vary 2-5x between runs; memory is what this "
        "table measures. The SDXL load row's peak is over the strict `resident + 1 GiB` (whole process) by the "
        "interpreter baseline: `import torch` alone is 0.50 GiB RSS here and diffusers' UNet class 0.33 GiB more; "
        "beyond that baseline, loading holds the resident bytes plus about one module, and the call's transient is "
        "the exact torch reference backend (float64 integer GEMMs for K > 1040: the largest SDXL conv, 1280 x 23040, "
        "is 0.22 GiB in float64).",
        "",
        "Before streaming (issue #11): `qdiff quantize --recipe w8a8` of the same SDXL UNet peaked at 15.2 GiB RSS "
        "(146 s); loading its export and drawing one 256 px step peaked at 5.0 GiB.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace the section (up to the next ``## `` heading) or append it."""
    doc = path.read_text()
    start = doc.find(SECTION)
    if start < 0:
        path.write_text(doc.rstrip("\n") + "\n\n" + text)
        return
    nxt = doc.find("\n## ", start + len(SECTION))
    path.write_text(doc[:start] + text + ("" if nxt < 0 else "\n" + doc[nxt + 1 :]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(CHILDREN[argv[1]](*argv[2:])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdxl", default="/work/scratch/sdxl-real")
    p.add_argument("--flux", default="/work/scratch/flux-real")
    p.add_argument("--scratch", default="/work/scratch")
    p.add_argument("--skip-flux", action="store_true")
    p.add_argument("--skip-in-memory", action="store_true")
    p.add_argument("--write", type=Path, help="replace the section in this Markdown file (docs/benchmarks.md)")
    p.add_argument("--results", type=Path, help="also save the raw results as JSON here")
    p.add_argument("--render", type=Path, help="measure nothing: render the table from saved --results JSON")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        results, command = saved["results"], saved["command"]
    else:
        results, command = measure(args), "python scripts/bench_memory.py " + " ".join(argv)
        if args.results:
            args.results.write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    text = render(table(results), command)
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
