# fastformer build and test entry points. `make test` on a fresh clone does everything.
SHELL := /bin/bash
.DEFAULT_GOAL := test

# Where python3 already has torch with CUDA (a GPU machine, which may have no network access), use that
# python and the packages it has. Everywhere else: .venv in the repository root, with torch 2.13.0 (CPU).
SYS_CUDA := $(shell python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo 1)
ifeq ($(SYS_CUDA),1)
PY ?= python3
STAMP := .sys-cuda.stamp
else
PY ?= .venv/bin/python
STAMP := .venv/.installed.stamp
endif
TORCH_CPU := torch==2.13.0
# Without a GPU, Triton kernels run on CPU tensors in the interpreter.
TEST_ENV := $(if $(SYS_CUDA),,TRITON_INTERPRET=1) OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
PYTEST_ARGS ?=
OUT ?= bench/results

.PHONY: env test lint format gpu-check bench demo cuda-compile-check clean info ext

env: $(STAMP)

.venv/.installed.stamp: pyproject.toml setup.py $(wildcard csrc/*)
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv/bin/python -m pip install -q $(TORCH_CPU)
	.venv/bin/python -m pip install -q pybind11 ninja
	.venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

.sys-cuda.stamp: pyproject.toml setup.py $(wildcard csrc/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps --no-index -e .
	touch $@

# Rebuild the fused-optimizer extension (fastformer/_C*.so) in place after editing csrc/; `make env`
# builds it as part of the editable install. FASTFORMER_NO_EXT=1 skips it (torch fallback).
ext: env
	$(PY) setup.py build_ext --inplace

# Compile the CUDA sources for sm_80 and sm_90 wherever nvcc exists, so a CUDA compile error fails CI
# even on machines without a GPU.
cuda-compile-check:
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/*.cu >/dev/null 2>&1; then \
	  for f in csrc/*.cu; do \
	    echo "nvcc (sm_80, sm_90): $$f"; \
	    nvcc -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	      -c $$f -o /tmp/fastformer_$$(basename $$f .cu).o || exit 1; \
	  done; \
	else echo "cuda-compile-check: skipped (no nvcc or no .cu files)"; fi

# Ruff (pyproject.toml [tool.ruff]): formatting and lint of the whole tree, before the tests. A GPU
# machine's own python may lack ruff (it has no network): there the check is skipped with a note.
lint: env
	@if [ "$(SYS_CUDA)" = "1" ] && ! $(PY) -m ruff --version >/dev/null 2>&1; then \
	  echo "lint: skipped (ruff is not installed for $(PY))"; \
	else \
	  $(PY) -m ruff format --check . && $(PY) -m ruff check .; \
	fi

# Rewrite the tree in the project's format and apply ruff's safe fixes.
format: env
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

test: env cuda-compile-check lint
	$(TEST_ENV) $(PY) -m pytest tests $(PYTEST_ARGS)

# One command for a GPU machine (see bench/gpu_check.py): the decisive benchmarks first, then the cuda
# tests, within GPU_CHECK_BUDGET seconds (about 9 minutes in all); the extension builds and the tuning
# candidates compile in the background; results land in $(OUT) (named for the device; their logs and
# the tuner's cache in $(OUT)/gpu_check_<device>_work/) and a short table is printed last. Then
# `python bench/make_readme.py` puts the new results into bench/README.md.
GPU_CHECK_BUDGET ?= 500
gpu-check:
	PY=$(PY) OUT=$(OUT) GPU_CHECK_BUDGET=$(GPU_CHECK_BUDGET) bash scripts/gpu_check.sh

# The CPU micro-benchmarks, then every benchmark script (bench/bench_*.py, bench/memory_estimate.py) as a
# step of gpu_check.py --allow-cpu; the experiments (pretraining_benefit.py, text2text_benefit.py,
# decoding_choice.py) need data and are run by hand.
bench: env
	$(TEST_ENV) $(PY) -m pytest bench --benchmark-only -q $(PYTEST_ARGS)
	$(TEST_ENV) $(PY) bench/gpu_check.py --out $(OUT) --budget 3600 --allow-cpu
	@if [ "$(OUT)" = bench/results ]; then $(PY) bench/make_readme.py; fi

info: env
	$(PY) -m fastformer info

# The main job: a couple of minutes of MLM pre-training on the built-in corpus (Python docstrings, no
# download). CPU: bert-tiny; a CUDA GPU: bert-base with bf16 autocast. A time budget without --steps:
# warmup and decay follow the 2 minutes, so the run ends with its schedule finished on any machine.
# Override with DEMO_ARGS=... (a later flag wins, e.g. DEMO_ARGS="--max-minutes 10").
# Each `make demo` replaces the previous demo run (--overwrite).
DEMO_OUT ?= runs/demo
demo: env
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  args="--model bert-base --batch-size 64 --seq-len 128 --lr 2e-4"; \
	else \
	  args="--model bert-tiny --batch-size 32 --seq-len 128 --lr 1e-3"; \
	fi; \
	echo "fastformer pretrain --objective mlm $$args --max-minutes 2 --eval-every 200 --save-every 200" \
	  "--out $(DEMO_OUT) --overwrite $(DEMO_ARGS)"; \
	PYTHONUNBUFFERED=1 $(PY) -m fastformer pretrain --objective mlm $$args --max-minutes 2 --eval-every 200 \
	  --save-every 200 --out $(DEMO_OUT) --overwrite $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache fastformer/*.so .sys-cuda.stamp
