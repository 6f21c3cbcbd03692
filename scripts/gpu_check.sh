#!/usr/bin/env bash
# One GPU session's checks, in one go: the kernel tests on the GPU (no interpreter) and the kernel benchmark.
# Usage (from the repo root, on a machine with a CUDA GPU and torch/triton installed): scripts/gpu_check.sh OUTDIR
# Works from an editable install or, as on the lent device machine, from a plain copy of the tree (it then lays
# out kernels/, recipes/ and calibration_prompts/ under qdiff/ the way the wheel installs them).
set -uo pipefail
OUT=${1:-out/gpu}
mkdir -p "$OUT"
python3 -c "import qdiff._kernels" 2>/dev/null || {
  cp -r kernels qdiff/_kernels && cp -r recipes qdiff/recipes && cp -r calibration_prompts qdiff/calibration_prompts
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
echo "== kernel tests on the GPU"
QDIFF_TEST_CUDA=1 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q tests/kernels -p no:cacheprovider -x 2>&1 \
  | tee "$OUT/kernel-tests.txt" | tail -25
echo "== kernel benchmark"
timeout "${BENCH_TIMEOUT:-200}" python3 -m qdiff.cli bench kernels --device cuda --out "$OUT/bench-kernels.md" 2>&1 \
  | tee "$OUT/bench-kernels.txt" | tail -40
