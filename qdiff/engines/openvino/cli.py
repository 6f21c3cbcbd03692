"""``qdiff export-openvino EXPORT OUT``: arguments and the command (one call to :func:`qdiff.export_openvino`)."""

from __future__ import annotations

from pathlib import Path

PRECISION_HELP = (
    "float precision of the non-quantized parts: f32, bf16, or per component, e.g. unet=bf16,vae_decoder=f32 "
    "(default: the measured choice per component, docs/openvino.md)"
)


def add_export_openvino_parser(sub) -> None:
    p = sub.add_parser("export-openvino", help="write a qdiff export as an OpenVINO pipeline folder (optimum-intel "
                       "layout) that qdiff and optimum-intel run on the CPU")  # fmt: skip
    p.add_argument("export", help="a qdiff export folder (qdiff quantize / qdiff.save)")
    p.add_argument("out", help="folder to create")
    p.add_argument("--precision", help=PRECISION_HELP)
    p.add_argument("--vae-encoder", action="store_true", help="also convert the VAE encoder (image-to-image)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_export_openvino(args) -> int:
    import time

    from qdiff.engines.openvino.export import export_openvino
    from qdiff.engines.openvino.precision import parse_precision
    from qdiff.engines.openvino.runtime import read_ov_manifest

    precision = parse_precision(args.precision) if args.precision else None
    start = time.perf_counter()
    out = export_openvino(args.export, args.out, precision=precision, vae_encoder=args.vae_encoder,
                          overwrite=args.overwrite, progress=not args.no_progress)  # fmt: skip
    doc = read_ov_manifest(Path(out))
    parts = ", ".join(f"{name} {entry['precision']} {_mib(Path(out) / name / 'openvino_model.bin'):.2f} MiB"
                      for name, entry in doc["components"].items())  # fmt: skip
    print(f"components  {parts}")
    print(f"dynamic quantization group size  {doc['dynamic_quantization_group_size']}")
    print(f"openvino    {out}  ({time.perf_counter() - start:.1f} s)")
    return 0


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20
