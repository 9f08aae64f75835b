#!/usr/bin/env bash
# Issue 13's domain bench in one command, for the offline GPU machine (no MLflow there; nothing here needs it):
# unpack the compact pack of the shared sets, derive the shifted domains, run every plan on every domain
# (`python -m bench domain_bench`), then fit the thresholds and report them leave-one-dataset-out
# (`python -m bench calibrate`); it runs them from the repository root, where `-m bench` finds the package.
#
#   make domains-pack        # here: .bench-data/pack.tar.gz and .bench-data/weights/ (git-ignored, ~52 MiB)
#   OUT=/tmp/out bash bench/gpu_domains.sh        # there, with .bench-data carried
#
# Knobs (environment): EPOCHS (default 4), JOBS (datasets at once, default 4), MAX_SECONDS (no new plan after
# this, default 420), DATASETS / ONLY (comma-separated subsets), IMAGE_SIZE (default: the model's own, 224),
# WORKERS (loader workers per process), PY (python3). Rows stream into $OUT/domain_bench.jsonl, so a run cut short keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
PY=${PY:-python3}
WORK=${WORK:-/tmp/finetune-domains}
mkdir -p "$OUT" "$WORK"
started=$(date +%s)
[ -d "$WORK/pack" ] || tar xzf .bench-data/pack.tar.gz -C "$WORK"
"$PY" -m bench domains variants "$WORK/pack" "$WORK/domains" ${ONLY:+--only "$ONLY"} > "$OUT/variants.log" 2>&1 \
  || { tail -n 30 "$OUT/variants.log"; exit 1; }
echo "pack + variants: $(( $(date +%s) - started )) s"
"$PY" -m bench domain_bench --manifest "$WORK/domains/domains.json" \
  --weights .bench-data/weights/mobilenetv2_100.coral_in1k.safetensors --epochs "${EPOCHS:-4}" --jobs "${JOBS:-4}" \
  --max-seconds "${MAX_SECONDS:-420}" --out "$OUT/domain_bench.jsonl" ${DATASETS:+--datasets "$DATASETS"} \
  ${IMAGE_SIZE:+--image-size "$IMAGE_SIZE"} ${WORKERS:+--workers "$WORKERS"} > "$OUT/bench.log" 2>&1 || { tail -n 60 "$OUT/bench.log"; exit 1; }
[ -f "$OUT/domain_bench.jsonl" ] || { echo "no rows"; exit 1; }
"$PY" - "$OUT/domain_bench.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["kind"] == "plan":
        print(f"{r['dataset']:<22} {r['plan']:<16} {r['reported_split']} {r['acc']:.4f} select {r['select_acc']:.4f} "
              f"tta {r['tta']:<6} {r['seconds']:>6.1f}s")
PYEOF
"$PY" -m bench calibrate "$OUT/domain_bench.jsonl" --out "$OUT/calibrate.md" > "$OUT/calibrate.log" 2>&1 \
  && cat "$OUT/calibrate.md" || tail -n 5 "$OUT/calibrate.log"
echo "total: $(( $(date +%s) - started )) s"
