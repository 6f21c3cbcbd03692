"""Write a REAL-SIZE random-weight denoiser checkpoint from a published config, never holding the model in memory.

    python scripts/make_real_checkpoint.py --family sdxl --out /work/scratch/sdxl-real           # fp16, 5.1 GB
    python scripts/make_real_checkpoint.py --family flux --out /work/scratch/flux-real           # bf16, 23.8 GB
    python scripts/make_real_checkpoint.py --family sd15 --config-json tiny.json --out /tmp/tiny --max-shard-gb 0.001
    python scripts/make_real_checkpoint.py --family sdxl --pipeline --out /work/scratch/sdxl-fp16-pipe  # + 80 MB

For testing streaming quantization (issue #11) without downloading weights. The denoiser is built on the meta
device from the config (written below, copied from the published ``config.json`` files); its state_dict gives names,
shapes and order. Shards are planned from the byte sizes alone, then each ``.safetensors`` file is written by
streaming (``qdiff.export.shards``, the writer qdiff's exports use): the header first, then one tensor at a time,
generated directly in the target dtype from a generator seeded by (``--seed``, tensor name) — so peak memory is
about one tensor (~110 MB for FLUX), not one shard, and the values do not depend on the shard size.
Init: 2-D+ weights ~ N(0, 0.02), 1-D weights (norms) = 1, biases = 0, persistent buffers their real values.

Output, the diffusers layout: ``OUT/{unet|transformer}/config.json`` and either one
``diffusion_pytorch_model.safetensors`` (when everything fits in one shard, as diffusers does) or
``diffusion_pytorch_model-0000K-of-0000N.safetensors`` shards with ``diffusion_pytorch_model.safetensors.index.json``
({"metadata": {"total_size": bytes}, "weight_map": {name: file}}); shards hold at most ``--max-shard-gb`` GB
(10^9 bytes, as diffusers counts) unless one tensor alone is larger. ``DenoiserClass.from_pretrained(OUT,
subfolder=...)`` loads it. ``--single-file`` writes all tensors into one file: ``OUT`` itself when it ends in
``.safetensors``, else ``OUT/{sub}/diffusion_pytorch_model.safetensors`` (+ config.json). Keys are always diffusers
names (what ``save_pretrained`` writes), not the original-repo names that diffusers' ``from_single_file`` expects.

``--pipeline`` (SDXL-style UNets) makes ``OUT`` a whole pipeline folder in the same dtype: beside ``unet/``, the tiny
SDXL pipeline's text encoders, tokenizers, VAE and scheduler, sized to drive the UNet
(``qdiff.models.tiny.tiny_sdxl_parts_for``: 2 layers per encoder, ~40 M parameters), and a ``model_index.json``
naming them all, so ``DiffusionPipeline.from_pretrained(OUT)`` and ``qdiff quantize --model OUT`` take it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qdiff.export import shards
from qdiff.export.shards import ShardedWriter, plan_shards, write_safetensors  # noqa: F401 (plan_shards: tests)
from qdiff.models.families import current_registry
from qdiff.models.published import FLUX_SCHNELL, PIXART_1024, SD15_UNET, SDXL_UNET

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = shards.index_name(WEIGHTS_NAME)
GB = 10**9

# --- published configs (the same values as tests/models/test_adapters.py) -------------------------------------------


@dataclass(frozen=True)
class Family:
    cls_name: str  # the diffusers denoiser class; its pipeline attribute (the subfolder) comes from the registry
    dtype: str  # the dtype the published weights ship in
    config: dict[str, Any]

    @property
    def subfolder(self) -> str:
        return subfolder_of(self.cls_name)


FAMILIES = {
    "sdxl": Family("UNet2DConditionModel", "fp16", SDXL_UNET),  # 2.57 B params
    "sd15": Family("UNet2DConditionModel", "fp16", SD15_UNET),  # 0.86 B
    "pixart": Family("PixArtTransformer2DModel", "fp16", PIXART_1024),  # 0.61 B
    "flux": Family("FluxTransformer2DModel", "bf16", FLUX_SCHNELL),  # 11.9 B
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def subfolder_of(cls_name: str) -> str:
    """The pipeline attribute the family registry declares for a denoiser class (``unet``, ``transformer``)."""
    arch = next((a for a in current_registry().architectures if cls_name in a.classes), None)
    if arch is None:
        raise SystemExit(f"error: {cls_name} is not a denoiser class of the family registry")
    return arch.attr


# --- planning -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec(shards.TensorSpec):
    init: str = "normal"  # "normal" | "ones" | "zeros" | "buffer"


def build_meta(cls_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """The denoiser with parameters on the meta device (no memory); buffers stay real (they are small)."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, cls_name)
    with init_empty_weights(include_buffers=False):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def tensor_specs(model: torch.nn.Module, dtype: torch.dtype) -> tuple[list[TensorSpec], dict[str, torch.Tensor]]:
    """One spec per state_dict entry, in state_dict order, plus the real values of persistent buffers."""
    params = {name for name, _ in model.named_parameters()}
    specs, buffers = [], {}
    for name, t in model.state_dict().items():
        out_dtype = dtype if t.is_floating_point() else t.dtype
        if name not in params:
            init = "buffer"
            buffers[name] = t.detach().to(out_dtype)
        elif name.endswith("bias"):
            init = "zeros"
        elif t.dim() == 1:
            init = "ones"
        else:
            init = "normal"
        specs.append(TensorSpec(name, tuple(t.shape), out_dtype, init))
    return specs, buffers


def shard_file_names(n: int) -> list[str]:
    """diffusers' names: one file unsharded, else ``diffusion_pytorch_model-0000K-of-0000N.safetensors``."""
    return shards.shard_file_names(n, WEIGHTS_NAME)


# --- writing --------------------------------------------------------------------------------------------------------


def make_tensor(spec: TensorSpec, seed: int, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor for ``spec``, generated directly in its dtype; seeded by (seed, name) only."""
    if spec.init == "buffer":
        return buffers[spec.name]
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=spec.dtype)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=spec.dtype)
    gen = torch.Generator("cpu").manual_seed((seed << 32) ^ zlib.crc32(spec.name.encode()))
    return torch.randn(spec.shape, generator=gen, dtype=spec.dtype).mul_(0.02)


def _clear_old(folder: Path) -> None:
    for p in folder.glob("diffusion_pytorch_model*.safetensors*"):
        p.unlink()


def write_checkpoint(model: torch.nn.Module, out: Path, dtype: torch.dtype, seed: int, max_bytes: int,
                     single_file: bool = False, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write a model folder ``out`` (config.json + shards, or one weights file with ``single_file``), or with a
    ``.safetensors`` path, just that file. Returns a summary."""
    specs, buffers = tensor_specs(model, dtype)
    total = sum(s.nbytes for s in specs)
    target = out.parent if out.suffix == ".safetensors" else out
    target.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target).free
    if total > free:
        raise SystemExit(f"error: {total / GB:.2f} GB to write but only {free / GB:.2f} GB free on {target}")
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="writing")
    try:
        if out.suffix == ".safetensors":
            write_safetensors(out, specs, lambda s: make_tensor(s, seed, buffers), bar.update)
            files = [out]
        else:
            _clear_old(out)
            model.save_config(out)
            limit = float("inf") if single_file else max_bytes
            writer = ShardedWriter(out, WEIGHTS_NAME, specs, limit, {"format": "pt"})
            try:
                for s in specs:  # one tensor in memory at a time
                    writer.write(s.name, make_tensor(s, seed, buffers))
                    bar.update(s.nbytes)
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        bar.close()
    shard_files = [f for f in files if f.suffix == ".safetensors"]
    return {"tensors": len(specs), "params": sum(torch.Size(s.shape).numel() for s in specs), "bytes": total,
            "files": [str(f) for f in shard_files]}  # fmt: skip


def verify(target: Path, model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Re-open what was written (headers only) and check every name, shape and dtype against the model."""
    from qdiff.export.checkpoint import open_checkpoint

    specs, _ = tensor_specs(model, dtype)
    with open_checkpoint(target) as reader:
        if set(reader.keys()) != {s.name for s in specs}:
            raise SystemExit(f"error: {target}: written names differ from the model's state_dict")
        for s in specs:
            if reader.shape(s.name) != s.shape or reader.dtype(s.name) != s.dtype:
                got = f"{reader.shape(s.name)} {reader.dtype(s.name)}"
                raise SystemExit(f"error: {target}: {s.name} reads back as {got}, expected {s.shape} {s.dtype}")


def write_pipeline_parts(folder: Path, cls_name: str, config: dict[str, Any], dtype: torch.dtype, seed: int) -> None:
    """Everything of an SDXL pipeline folder but its UNet, in ``dtype``; ``model_index.json`` names the UNet too."""
    from qdiff.errors import QdiffError
    from qdiff.models.tiny import tiny_sdxl_parts_for

    if cls_name != "UNet2DConditionModel" or config.get("addition_embed_type") != "text_time":
        raise SystemExit(f"error: --pipeline needs an SDXL-style UNet (text_time conditioning), not this {cls_name}")
    try:
        pipe = tiny_sdxl_parts_for(config, seed).to(dtype=dtype)
    except QdiffError as exc:
        raise SystemExit(f"error: --pipeline: {exc}") from None
    pipe.save_pretrained(folder, safe_serialization=True)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index[subfolder_of(cls_name)] = ["diffusers", cls_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _load_config(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    family = FAMILIES[args.family]
    if args.config_json is None:
        return family.cls_name, family.subfolder, dict(family.config)
    config = json.loads(Path(args.config_json).read_text())
    cls_name = config.get("_class_name", family.cls_name)
    return cls_name, subfolder_of(cls_name), config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder (or a .safetensors path with --single-file)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: as published (flux bf16, else fp16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit in 10^9 bytes (default 5)")
    p.add_argument("--single-file", action="store_true", help="one .safetensors file, diffusers key names")
    p.add_argument("--config-json", type=Path, help="use this config.json instead of the family's published one")
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="sdxl: also the tiny SDXL text encoders, tokenizers, VAE, scheduler and model_index.json",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cls_name, subfolder, config = _load_config(args)
    dtype = DTYPES[args.dtype or FAMILIES[args.family].dtype]
    model = build_meta(cls_name, config)
    out = args.out if args.out.suffix == ".safetensors" else args.out / subfolder
    if out.suffix == ".safetensors" and not args.single_file:
        raise SystemExit("error: --out is a .safetensors file; add --single-file (or give a folder)")
    start = time.perf_counter()
    if args.pipeline:
        if out.suffix == ".safetensors" or args.single_file:
            raise SystemExit("error: --pipeline writes a pipeline folder; drop --single-file")
        write_pipeline_parts(args.out, cls_name, config, dtype, args.seed)  # small; checks the config first
    summary = write_checkpoint(model, out, dtype, args.seed, int(args.max_shard_gb * GB), args.single_file,
                               progress=not args.no_progress)  # fmt: skip
    verify(out, model, dtype)
    print(f"{cls_name}: {summary['params']:,} params, {summary['tensors']} tensors, {summary['bytes'] / GB:.2f} GB "
          f"in {len(summary['files'])} file(s) under {Path(summary['files'][0]).parent} "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
