#!/usr/bin/env bash
# The GPU check of issue 11 in one script: GPU smoke tests, then throughput vs the bare model.
#
#   make gpu-wheels          # here, with network: .whl/ = the wheels the GPU machine lacks (MLflow & co.)
#   bash bench/gpu_check.sh  # there (offline, bare): install .whl/, run `pytest -m gpu`, measure
#
# Steps:
#   1. installs .whl/*.whl into $GPU_CHECK_SITE (default /tmp/site) with pip --no-index --no-deps --target,
#      and puts it and the checkout on PYTHONPATH (no `pip install -e`: the project imports from here);
#      skipped with a message when .whl/ is absent or empty;
#   2. picks the interpreter: $PYTHON if given (e.g. PYTHON="uv run --frozen python"), else python3 if
#      it imports torch, pytorch_lightning, timm and mlflow, else `uv run --frozen python` when uv and
#      uv.lock are here (a development machine);
#   3. `python -m bench mlflow_smoke`: MLflow works (SQLite run, pyfunc log/register/load/predict), seconds;
#   4. without CUDA: says so and stops here, exit 0 (GPU tests and throughput skipped);
#   5. with CUDA: `python -m pytest -m gpu -x -q` (tests/test_gpu.py), then `python -m bench gpu_throughput`
#      (resnet50 @224, random weights file, generated JPEGs; one table of finetune vs bare img/s).
# Each step has a time limit so the whole script ends within 8 minutes (GPU_CHECK_TEST_TIMEOUT,
# GPU_CHECK_BENCH_TIMEOUT, in seconds). The log and the throughput CSV go to $OUT when set (the device
# tool's folder), else bench/results/. Exit status: 0 when every step that ran passed.
# To test the script on a CPU machine: GPU_CHECK_ASSUME_CUDA=1 runs step 5 anyway (the tests then skip),
# and GPU_THROUGHPUT_ARGS="--allow-cpu --model resnet18 --image-size 64 --images 48 ..." sizes the bench.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SITE=${GPU_CHECK_SITE:-/tmp/site}
RESULTS=${OUT:-$ROOT/bench/results}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-240}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-200}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
started=$SECONDS
say() { echo "== gpu_check [$((SECONDS - started))s]: $*"; }
status=0

# 1. wheels
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
shopt -s nullglob
wheels=("$ROOT"/.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    say ".whl/ is absent or empty: no wheels to install (run 'make gpu-wheels' where there is network)"
elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}"; then
    export PYTHONPATH=$SITE:$PYTHONPATH
    say "installed ${#wheels[@]} wheels from .whl/ into $SITE"
else
    say "installing .whl/ with $(command -v python3) failed (wheels for another Python?); not using $SITE"
fi

# 2. interpreter
probe='import torch, pytorch_lightning, timm, mlflow'
if [ -n "${PYTHON:-}" ]; then
    say "interpreter from \$PYTHON: $PYTHON"
elif python3 -c "$probe" 2>/dev/null; then
    PYTHON=python3
    say "interpreter: $(command -v python3)"
elif command -v uv >/dev/null && [ -f uv.lock ]; then
    PYTHON="uv run --frozen python"
    export PYTHONPATH=$ROOT  # the project env has everything; $SITE may hold another Python's wheels
    say "python3 lacks torch/lightning/timm/mlflow here: using '$PYTHON' (the project env)"
else
    say "FAILED: python3 cannot import torch, pytorch_lightning, timm and mlflow, and there is no uv;" \
        "set PYTHON=... or fill .whl/ (make gpu-wheels)"
    python3 -c "$probe"
    exit 1
fi
read -r -a PY <<<"$PYTHON"
"${PY[@]}" - <<'EOF'
import platform, importlib.metadata as md
import torch
names = ["torch", "pytorch-lightning", "timm", "torchvision", "mlflow-skinny", "protobuf", "numpy", "pandas"]
versions = []
for n in names:
    try:
        versions.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        versions.append(f"{n} -")
print(f"python {platform.python_version()}; " + ", ".join(versions))
print(f"CUDA available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""))
EOF

# 3. MLflow
say "MLflow smoke check"
if ! timeout 120 "${PY[@]}" -m bench mlflow_smoke 2>&1 | grep -v "WARNING mlflow.utils.git_utils"; then
    say "FAILED: MLflow does not work with this interpreter (a wheel missing from .whl/?)"
    exit 1
fi

# 4. CUDA?
if [ "${GPU_CHECK_ASSUME_CUDA:-0}" = 1 ]; then
    say "GPU_CHECK_ASSUME_CUDA=1: running the GPU steps whatever torch says (to test this script)"
elif ! "${PY[@]}" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; then
    say "CUDA not available: skipping the GPU tests (pytest -m gpu) and the GPU throughput measurement"
    say "done (nothing measured), exit 0"
    exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L || true

# 5. GPU tests, then throughput
say "GPU tests: pytest -m gpu -x -q (limit ${TEST_TIMEOUT}s)"
if timeout "$TEST_TIMEOUT" "${PY[@]}" -m pytest -m gpu -x -q -p no:cacheprovider --timeout 120; then
    say "GPU tests passed"
else
    rc=$?
    say "FAILED: GPU tests (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
    status=1
fi
say "throughput vs the bare model (limit ${BENCH_TIMEOUT}s)"
if timeout "$BENCH_TIMEOUT" "${PY[@]}" -m bench gpu_throughput --out "$RESULTS" ${GPU_THROUGHPUT_ARGS:-}; then
    say "throughput measured"
else
    rc=$?
    say "FAILED: throughput (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
    status=1
fi
say "done, exit $status (log: $LOG)"
exit $status
