"""GPU timing of a split vs unsplit frozen QuantConv2d on SDXL-sized up-block convs (torch integer path).

python scripts/gpu_split_conv.py      # on a CUDA machine; run once on the lent NVIDIA H200, 2026-11-26
"""

import time

import torch
from torch import nn

from qdiff.config.layer import LayerQuant
from qdiff.numerics.primitives import compute_qparams
from qdiff.quant.modules import quant_module_for

d = "cuda"
torch.manual_seed(0)


def bench(f, n=10):
    f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def qp(t):
    return compute_qparams(t.min().float(), t.max().float(), 8, False)


with torch.no_grad():
    for cu, cs, n, hw in [(1280, 1280, 1280, 32), (640, 320, 320, 128)]:
        conv = nn.Conv2d(cu + cs, n, 3, padding=1).to(d).half()
        x = torch.randn(2, cu + cs, hw, hw, device=d).half()
        x[:, cu:] *= 20
        ref = conv(x).float()
        print(f"conv {cu}+{cs}->{n} @{hw}: fp16 {bench(lambda c=conv, x=x: c(x)):.2f} ms", flush=True)
        for mode in ("dynamic", "static"):
            for split in (cu, None):
                m = quant_module_for(conv, LayerQuant(a_bits=8, a_mode=mode, a_split=split))
                if mode == "static":
                    if split:
                        m.set_act_qparams(*[list(v) for v in zip(qp(x[:, :cu]), qp(x[:, cu:]))])
                    else:
                        m.set_act_qparams(*qp(x))
                fake = m(x).float()
                m.freeze()
                y = m(x).float()
                err = float((fake - y).abs().max() / fake.abs().max())
                sq = float(10 * torch.log10(ref.double().pow(2).sum() / (y.double() - ref.double()).pow(2).sum()))
                print(
                    f"  {mode:7s} split={split}: frozen {bench(lambda m=m, x=x: m(x)):.2f} ms, "
                    f"fake-vs-frozen {err:.1e}, SQNR {sq:.1f} dB",
                    flush=True,
                )
