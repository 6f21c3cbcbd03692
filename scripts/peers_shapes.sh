#!/usr/bin/env bash
# qdiff W4A8 / W8A8 beside the peer quantizers (bitsandbytes, optimum-quanto, torchao) on the bundled Shapes model:
# same held-out prompts and seeds for every variant (issue 13). Needs `pip install 'qdiff[peers]'`.
# Usage: scripts/peers_shapes.sh [OUT=out/peers-shapes] [N=64 prompts]. On 2 shared CPU cores 64 prompts take
# ~30 min (10 variants); 256 take four times that.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/peers-shapes}
N=${2:-64}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
for r in w4a8 w8a8; do
  [ -d "$OUT/shapes-$r" ] || qdiff quantize --recipe "shapes-$r" --out "$OUT/shapes-$r" --no-progress
done
python - "$OUT" "$N" <<'EOF'
import sys

from qdiff.config.recipe import Recipe
from qdiff.eval.peers import add_peers, peer_names
from qdiff.eval.report import markdown_table, save_report
from qdiff.eval.run import Evaluator, default_setup, variant_name
from qdiff.export.resolve import load_pipeline
from qdiff.sampling.prompts import load_prompts

out, n = sys.argv[1], int(sys.argv[2])
models = ["builtin:shapes", f"{out}/shapes-w4a8", f"{out}/shapes-w8a8"]
sampler, prompt_set = default_setup(models)  # what `qdiff eval` uses: the first export's sampler, held-out prompts
ev = Evaluator(load_prompts(prompt_set, n), sampler, seed=0, batch_size=16, progress=False)
for spec in models:
    pipe = load_pipeline(spec)
    ev.add(variant_name(pipe, list(ev.metrics)), pipe)
    del pipe
add_peers(ev, "builtin:shapes", peer_names(), Recipe.load("shapes-w4a8"))  # qdiff's layers, its calibration prompts
result = ev.result()
save_report(result, f"{out}/report", overwrite=True, command=f"scripts/peers_shapes.sh {out} {n}")
print(markdown_table(result))
print("\n".join(f"- {note}" for note in result.notes))
EOF
