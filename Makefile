# The two commands of the README. Each bootstraps its own environment with uv (installed if missing);
# uv resolves PyPI's torch, unlike this machine's pip configuration (see README "Install").
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PYTEST_ARGS ?=

.PHONY: demo test test-install test-slow test-all test-gpu gpu-wheels domains-pack env clean

$(UV):
	python3 -m pip install --user --quiet uv || python3 -m pip install --quiet uv || \
	  (curl -LsSf https://astral.sh/uv/install.sh | sh)

env: $(UV)
	$(UV) sync --frozen --extra onnx --python 3.11 --compile-bytecode

demo: env
	$(UV) run --frozen finetune demo

test: env
	$(UV) run --frozen pytest -m "not slow" $(PYTEST_ARGS)

# The wheel in a fresh venv (not the editable checkout) plans and trains from another folder: proves the wheel
# carries what finetune reads at run time. About a minute with uv's cache warm (the venv compiles what it imports);
# CI runs it after `make test` (.ci/run), which it would push past 8 minutes on 2 cores.
test-install: env
	$(UV) run --frozen pytest -m slow tests/test_install.py $(PYTEST_ARGS)

test-slow: env
	$(UV) run --frozen pytest -m "slow" $(PYTEST_ARGS)

test-all: env
	$(UV) run --frozen pytest $(PYTEST_ARGS)

# GPU smoke tests (tests/test_gpu.py); skipped with "CUDA not available" on a machine without CUDA.
# They are in `make test` too (skipped there without CUDA). On the offline GPU machine without uv:
# bench/gpu_check.sh.
test-gpu: env
	$(UV) run --frozen pytest -m gpu $(PYTEST_ARGS)

# The wheels the offline GPU machine lacks (MLflow and the part of its tree not there), at uv.lock's
# versions, into .whl/ (git-ignored) for bench/gpu_check.sh; prints each size and the total.
gpu-wheels:
	python3 -m bench gpu_wheels

# The domain bench's data for the GPU machine (bench/gpu_domains.sh): a <= 40 MiB archive of the shared sets
# and the shared weights, under .bench-data/ (git-ignored). Needs ../shared.
domains-pack: env
	$(UV) run --frozen python -m bench domains pack ../shared/data .bench-data/pack --archive .bench-data/pack.tar.gz
	mkdir -p .bench-data/weights && cp ../shared/weights/mobilenetv2_100.coral_in1k.* .bench-data/weights/

clean:
	rm -rf outputs .pytest_cache
