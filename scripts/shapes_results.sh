#!/usr/bin/env bash
# Reproduce every Shapes number quoted in README.md / docs/results.md (2 CPU cores, 1 thread: ~20 min).
# Usage: scripts/shapes_results.sh [OUT=out/shapes-results]. Copies the committed artefacts to docs/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/shapes-results}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
mkdir -p "$OUT" docs/results
log() { echo "[$(date +%H:%M:%S)] $*"; }
q() { [ -d "$OUT/$2" ] || qdiff quantize --recipe "$1" --out "$OUT/$2" --no-progress "${@:3}"; }

log "uniform exports"
q shapes-w8a8 w8a8
q shapes-w4a8 w4a8
q shapes-w3a8 w3a8
q shapes-w4a8-static w4a8-static

log "MixDQ calibration (fast sensitivity) and the mixed-precision export"
[ -d "$OUT/calib" ] || /usr/bin/time -f "calibrate wall %e s" qdiff calibrate --recipe shapes-mixdq-w4a8 --out "$OUT/calib" --no-progress
[ -d "$OUT/mixdq-w4a8" ] || qdiff quantize --calib "$OUT/calib" --out "$OUT/mixdq-w4a8" --no-progress

python - "$OUT" > "$OUT/mixdq-bits.json" <<'PY'
import json, sys
import qdiff
from qdiff.calib.allocate import measured_weight_bits
from qdiff.models.adapters import find_denoiser
out = sys.argv[1]
measured = measured_weight_bits(find_denoiser(qdiff.load(f"{out}/mixdq-w4a8"))[1])
plan = json.load(open(f"{out}/calib/plan.json"))["meta"]
print(json.dumps({"plan_achieved_w_bits": plan["achieved_w_bits"], "budget": plan.get("w_budget"), **measured}))
PY
cat "$OUT/mixdq-bits.json"

log "content_weight of the joint ILP: validation on the calibration prompts (other seeds), never the held-out set"
if [ ! -f "$OUT/cw-validation/report.md" ]; then
  cws=()
  for w in 0.3 0.5 0.7 0.9; do
    sed "s/content_weight: [0-9.]*}/content_weight: $w}/; s/^name: .*/name: mixdq-cw$w/" \
      "$(python -c 'import qdiff.recipes, pathlib; print(pathlib.Path(qdiff.recipes.__file__).parent)')/shapes-mixdq-w4a8.yaml" \
      > "$OUT/cw$w.yaml"
    [ -d "$OUT/cw$w" ] || qdiff calibrate --recipe "$OUT/cw$w.yaml" --out "$OUT/cw$w-calib" --no-progress
    [ -d "$OUT/cw$w" ] || qdiff quantize --calib "$OUT/cw$w-calib" --out "$OUT/cw$w" --no-progress
    cws+=("$OUT/cw$w")
  done
  qdiff eval builtin:shapes "$OUT/w4a8-static" "${cws[@]}" --prompts shapes --num-prompts 64 --seed 5000 \
      --out "$OUT/cw-validation" --no-progress
fi

log "fast vs full sensitivity, BOS-aware on vs off"
[ -f "$OUT/sens/report.json" ] || python -m qdiff.calib.sensitivity_report --model builtin:shapes \
    --recipe shapes-mixdq-w4a8 --out "$OUT/sens" --bos

log "Q-Sched on W4A8 and W3A8 (per-step, compass search, shapes-clip + shapes-quality)"
for b in w4a8 w3a8; do
  [ -d "$OUT/$b-qsched" ] || qdiff fit-schedule "$OUT/$b" --out "$OUT/$b-qsched" --no-progress \
      --log "$OUT/$b-qsched.log.jsonl"
done

log "Q-Sched optimisers: the reference 10x10 grid vs compass search and CMA-ES at 20% of its generations"
[ -f "$OUT/qsched-compare/results.json" ] || python -m qdiff.eval.qsched_compare --model "$OUT/w4a8" \
    --recipe shapes-w4a8 --out "$OUT/qsched-compare" --set grid:ramp --set coordinate:per_step \
    --set cmaes:per_step --set coordinate:ramp

log "activation ranges and BOS statistics of the float model (model card)"
[ -f "$OUT/ranges.json" ] || python -m qdiff.models.shapes.analysis --n 32 --out "$OUT/ranges.json"

log "qdiff eval on 256 held-out prompts"
qdiff eval builtin:shapes "$OUT/w8a8" "$OUT/w4a8" "$OUT/w4a8-qsched" "$OUT/w3a8" "$OUT/w3a8-qsched" \
    "$OUT/w4a8-static" "$OUT/mixdq-w4a8" --num-prompts 256 --out "$OUT/eval" --overwrite --no-progress

cp "$OUT/eval/report.md" docs/results/shapes-eval.md
cp "$OUT/eval/report.json" docs/results/shapes-eval.json
cp "$OUT/eval/grid.png" docs/results/shapes-grid.png
cp "$OUT/sens/report.json" docs/results/shapes-sensitivity.json
cp "$OUT/calib/sensitivity.png" docs/results/shapes-sensitivity.png
cp "$OUT/calib/plan.json" docs/results/shapes-mixdq-w4a8-plan.json
cp "$OUT/mixdq-bits.json" docs/results/shapes-mixdq-w4a8-bits.json
cp "$OUT/ranges.json" docs/results/shapes-activation-ranges.json
cp "$OUT/cw-validation/report.md" docs/results/shapes-mixdq-content-weight-validation.md
cp "$OUT/qsched-compare/results.json" docs/results/shapes-qsched-compare.json
cp "$OUT/qsched-compare/curves.png" docs/results/shapes-qsched-curves.png
log "done: docs/results/"
