"""BOS-aware cross-attention K/V (MixDQ, arXiv 2405.17873, Sec. 4.1).

The first token of a CLIP text embedding (BOS) is an outlier (~800 vs ~10-15 in SD/SDXL). Only the
cross-attention ``to_k`` / ``to_v`` layers consume it. :class:`BOSQuantLinear` therefore

* passes tokens ``1..T-1`` through the ordinary quantized path (its activation quantizer and any
  calibration observer never see token 0), and
* computes token 0's output row with the full-precision weight.

In the frozen state the float weight is gone, so the row comes from one of two small buffers:

* ``bos_mode = "cached"`` — ``bos_row`` (N,) fp32 = ``W_fp @ e_bos + b``, valid when token 0's embedding
  is the same for every prompt (a causal text encoder: position 0 attends only to itself). Checked per
  model by :func:`probe_bos`, never assumed.
* ``bos_mode = "per_call"`` — ``bos_weight`` (N, K) fp32, a copy of the float weight (honest: its bytes
  count in :meth:`~qdiff.quant.modules.QuantLayer.nbytes`), used when the probe finds token 0 varies.

Cached mode assumes that token 0 of every input is the probed BOS embedding; prompt embeddings that do
not start with it (e.g. hand-made ``prompt_embeds``) need ``per_call``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qdiff.quant.modules import QuantLinear

BOS_MODES = ("cached", "per_call")


class BOSQuantLinear(QuantLinear):
    """A :class:`QuantLinear` for cross-attention K/V whose token-0 output row is computed in full precision."""

    bos_mode: str = "cached"
    _bos_embedding: Tensor | None = None

    def set_bos(self, mode: str, embedding: Tensor | None = None) -> None:
        """Choose the mode; ``cached`` needs the (K,) BOS embedding that the frozen row is computed from."""
        if mode not in BOS_MODES:
            raise ValueError(f"bos mode must be one of {BOS_MODES}, got {mode!r}")
        if mode == "cached" and embedding is None:
            raise ValueError("cached BOS mode needs the BOS embedding")
        self.bos_mode = mode
        self._bos_embedding = None if embedding is None else embedding.detach().reshape(-1).float().cpu()

    def _bos_out(self, x0: Tensor) -> Tensor:
        """(B, 1, K) token-0 inputs -> (B, 1, N) full-precision outputs."""
        bias = None if self.bias is None else self.bias.to(x0.dtype)
        if self.state == "fake":
            return F.linear(x0, self.weight.to(x0.dtype), bias)
        if self.bos_mode == "cached":
            return self.bos_row.to(x0.dtype).expand(x0.shape[0], 1, -1)
        return F.linear(x0, self.bos_weight.to(x0.dtype), bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] == 0:
            return super().forward(x)
        rest = super().forward(x[:, 1:])  # (B, T-1, N): quantized path, observer sees tokens 1.. only
        return torch.cat([self._bos_out(x[:, :1]), rest], dim=1)

    @torch.no_grad()
    def freeze(self) -> None:
        if self.state == "frozen":
            return
        w = self.weight.detach()
        if self.bos_mode == "cached":
            if getattr(self, "_bos_embedding", None) is None:
                raise RuntimeError("cached BOS row needs set_bos('cached', embedding) before freeze()")
            row = w.double() @ self._bos_embedding.to(w.device).double()  # (N,) in float64
            if self.bias is not None:
                row = row + self.bias.detach().double()
            self.register_buffer("bos_row", row.float())
        else:
            self.register_buffer("bos_weight", w.float().clone())
        super().freeze()

    def make_bos_shell(self, mode: str, device: torch.device | str = "meta") -> None:
        """Empty BOS buffer of the right shape on a frozen shell (for loading an export)."""
        if mode not in BOS_MODES:
            raise ValueError(f"bos mode must be one of {BOS_MODES}, got {mode!r}")
        self.bos_mode = mode
        n, k = self.out_features_2d, self.in_features_2d
        if mode == "cached":
            self.register_buffer("bos_row", torch.empty(n, dtype=torch.float32, device=device))
        else:
            self.register_buffer("bos_weight", torch.empty(n, k, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bos={self.bos_mode}"
