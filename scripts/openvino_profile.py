"""Where does a qdiff UNet spend its time on OpenVINO, next to NNCF's int8 UNet? (docs/openvino.md, "Why the misses")

    python scripts/run_alone.py python scripts/openvino_profile.py \
        --mixdq-plan docs/results/shapes-mixdq-w4a8-plan.json --rounds 30 --out docs/results/openvino-profile.md

Builds the Shapes UNets of ``shapes-w8a8-static`` and ``shapes-mixdq-w4a8`` (the given plan) as qdiff's OpenVINO
export writes them, and NNCF's int8 UNet (the ``openvino-nncf-int8`` peer), all with bf16 float parts, compiles each
with the CPU plugin's per-node counters (``PERF_COUNT``) and calls them on the same inputs (16 held-out prompts with
classifier-free guidance: batch 32) in interleaved rounds. For each, the best call's per-node times are summed by
node type and execution kernel. ``--hoist`` adds a variant of the MixDQ UNet whose per-tensor activation quantizers
are moved above the Reshape / Transpose nodes before them (an experiment: the same codes for the same input, but the
plugin then fuses them into other nodes, in another precision), with its output difference.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import numpy as np

LAYOUT_OPS = ("Reshape", "Transpose")


def hoist_fake_quantize(model) -> int:
    """Move each per-tensor ``FakeQuantize`` above the chain of single-consumer Reshape / Transpose nodes feeding it
    (a per-tensor quantizer commutes with any reshape or permutation). Returns how many moved."""
    import openvino.opset13 as ops

    moved = 0
    for fq in [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]:
        bounds = [fq.input_value(i).get_node() for i in range(1, 5)]
        if any(b.get_type_name() != "Constant" or b.get_data().size != 1 for b in bounds):
            continue
        src, chain = fq.input_value(0), 0
        while src.get_node().get_type_name() in LAYOUT_OPS and len(src.get_target_inputs()) == 1:
            src, chain = src.get_node().input_value(0), chain + 1
        consumers = list(src.get_target_inputs())
        if not chain or len(consumers) != 1:
            continue
        scalars = [ops.constant(np.float32(b.get_data().reshape(()))) for b in bounds]
        consumers[0].replace_source_output(ops.fake_quantize(src, *scalars, fq.get_levels()).output(0))
        for target in list(fq.output(0).get_target_inputs()):
            target.replace_source_output(fq.input_value(0))
        moved += 1
    model.validate_nodes_and_infer_types()
    return moved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixdq-plan", required=True, help="a shapes-mixdq-w4a8 plan.json")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--hoist", action="store_true", help="also time the MixDQ UNet with its quantizers hoisted")
    ap.add_argument("--out", help="also write the tables here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qdiff-ov-profile-") as tmp:
        return _profile(args, Path(tmp))


def _profile(args: argparse.Namespace, tmp: Path) -> int:
    import copy

    import openvino as ov
    import torch

    import qdiff
    from qdiff.bench.cpu_openvino import _unet_inputs
    from qdiff.bench.report import write_atomic
    from qdiff.config.recipe import Recipe
    from qdiff.engines.openvino.convert import widen_for_int8_kernels
    from qdiff.engines.openvino.export import write_openvino
    from qdiff.engines.openvino.runtime import compile_config, read_ov_manifest
    from qdiff.eval.peers import PEERS
    from qdiff.export.resolve import load_pipeline
    from qdiff.sampling.prompts import load_prompts
    from qdiff.utils.machine import cpu_name

    base = load_pipeline("builtin:shapes")
    folders = {}
    for name, recipe, plan in (("qdiff W8A8-static", "shapes-w8a8-static", None),
                               ("qdiff MixDQ W4A8", "shapes-mixdq-w4a8", args.mixdq_plan)):  # fmt: skip
        folders[name] = tmp / recipe
        folders[name].mkdir()
        write_openvino(qdiff.quantize(copy.deepcopy(base), recipe, plan=plan, progress=False), folders[name])
    static = Recipe.load("shapes-w8a8-static")  # the peer calibrates on its prompts, as in qdiff bench cpu
    nncf, _ = PEERS["openvino-nncf-int8"].build(lambda: load_pipeline("builtin:shapes"), static, [])
    folders["NNCF int8"] = Path(nncf._qdiff_folder.name)
    with torch.inference_mode():  # the float pipeline's text encoder, as qdiff bench cpu encodes them
        inputs = _unet_inputs(base, load_prompts("shapes-heldout", 16))
    batch = inputs["sample"].shape[0]
    feed = {"sample": inputs["sample"].numpy(), "timestep": np.full((batch,), 499.0, np.float32),
            "encoder_hidden_states": inputs["encoder_hidden_states"].numpy()}  # fmt: skip

    core, compiled = ov.Core(), {}
    plans = [(name, folder, False) for name, folder in folders.items()]
    plans += [("qdiff MixDQ W4A8, quantizers hoisted", folders["qdiff MixDQ W4A8"], True)] if args.hoist else []
    notes = []
    for name, folder, hoist in plans:
        group = read_ov_manifest(folder)["dynamic_quantization_group_size"]
        config = {**compile_config("bf16", group, None), "PERF_COUNT": True}
        model = core.read_model(folder / "unet" / "openvino_model.xml")
        widen_for_int8_kernels(model)
        if hoist:
            notes.append(f"{name}: {hoist_fake_quantize(model)} quantizers moved above Reshape/Transpose")
        cm = core.compile_model(model, "CPU", config)
        compiled[name] = (cm, cm.create_infer_request(), [feed[p.get_any_name()] for p in model.inputs])

    best, profile, outputs = collections.defaultdict(lambda: float("inf")), {}, {}
    for _ in range(args.rounds):
        for name, (cm, request, args_in) in compiled.items():
            start = time.perf_counter()
            result = request.infer(args_in)
            seconds = time.perf_counter() - start
            outputs[name] = result[cm.outputs[0]].copy()
            if seconds < best[name]:
                best[name] = seconds
                info = request.profiling_info
                profile[name] = [(p.node_type, p.exec_type, p.real_time.total_seconds()) for p in info]

    cpu = f"{cpu_name()}, {time.strftime('%Y-%m-%d')}"
    lines = [f"Shapes UNet on OpenVINO {ov.__version__}, bf16 float parts, batch {batch} (16 held-out prompts, CFG), "
             f"best of {args.rounds} interleaved rounds, {cpu}", ""]  # fmt: skip
    lines += ["| UNet | best call (ms) | node times summed (ms) | nodes |", "|---|---|---|---|"]
    for name in compiled:
        lines.append(f"| {name} | {best[name] * 1e3:.1f} | {sum(t for *_, t in profile[name]) * 1e3:.1f} | "
                     f"{len(profile[name])} |")  # fmt: skip
    keys = collections.Counter()
    sums = {name: collections.Counter() for name in compiled}
    counts = {name: collections.Counter() for name in compiled}
    for name, rows in profile.items():
        for node_type, exec_type, seconds in rows:
            key = f"{node_type} ({exec_type})"
            sums[name][key] += seconds * 1e3
            counts[name][key] += 1
            keys[key] += seconds
    names = list(compiled)
    lines += ["", "| node (kernel) | " + " | ".join(f"{n}: count, ms" for n in names) + " |",
              "|---|" + "---|" * len(names)]  # fmt: skip
    for key, _ in keys.most_common(20):
        lines.append(f"| {key} | " + " | ".join(f"{counts[n][key]}, {sums[n][key]:.2f}" for n in names) + " |")
    if args.hoist:
        ref, moved = outputs["qdiff MixDQ W4A8"], outputs["qdiff MixDQ W4A8, quantizers hoisted"]
        rel = float(np.linalg.norm(moved - ref) / np.linalg.norm(ref))
        notes.append(f"hoisted vs as exported: output rel-l2 {rel:.2e}")
    lines += ["", *notes]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_atomic(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
