#!/bin/bash
# Issue 4 acceptance: on ../shared/data/clothing, the large-similar default recipe against the same run
# with --augment none --ema 0. Both runs at once, so they share the same CPU load; prints val accuracy.
# Usage: bench/recipe_vs_none.sh [EPOCHS] [IMAGE_SIZE]   (defaults 3, 128: ~25 min on 2 busy cores)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-3}
SIZE=${2:-128}
OUT=bench/results/recipe_vs_none-$EPOCHS-$SIZE
# One torch thread per process: on 2 cores shared by several jobs, OpenMP threads wait on each other at
# every op (measured here: 32 s vs 2.9 s per mobilenetv2 training step).
export OMP_NUM_THREADS=1
COMMON=(../shared/data/clothing --model mobilenetv2_100
        --weights ../shared/weights/mobilenetv2_100.coral_in1k.safetensors --scenario large-similar
        --epochs "$EPOCHS" --image-size "$SIZE" --batch-size 32 --num-workers 1 --tta none
        --experiment bench-recipe)
mkdir -p "$OUT"
nice -n 5 uv run finetune train "${COMMON[@]}" --output "$OUT/default" > "$OUT-default.log" 2>&1 &
nice -n 5 uv run finetune train "${COMMON[@]}" --augment none --ema 0 --output "$OUT/baseline" > "$OUT-baseline.log" 2>&1 &
wait
uv run python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':<10} {'val_acc':>8} {'val_loss':>9} {'best_epoch':>10} weights")
for name in ("default", "baseline"):
    m = json.loads((out / name / "summary.json").read_text())["metrics"]
    print(f"{name:<10} {m['val_acc']:>8.4f} {m['val_loss']:>9.4f} {m['best_epoch']:>10} {m['weights']}")
PY
