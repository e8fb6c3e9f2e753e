# Two commands on a fresh clone: `make demo` and `make test` (each installs first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench experiment clean gpu-wheels gpu-check

install: $(STAMP)

# Re-runs pip only when the dependency declarations change.
$(STAMP): setup.py requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c requirements/cpu.txt -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m megatron_ext.demo

# Mini-LongSkywork (about 70 min on 2 cores): runs/mini/report.md and results.json; resumable.
experiment: install
	$(PY) -m megatron_ext.experiments.mini_longskywork --out runs/mini $(if $(wildcard runs/mini/experiment.json),--resume,)

bench: install
	MALLOC_MMAP_THRESHOLD_=131072 $(PY) -m bench.ring_attention
	MALLOC_MMAP_THRESHOLD_=131072 $(PY) -m bench.cp_methods
	$(PY) -m bench.preprocess

# The prepared GPU acceptance run (docs/gpu.md). gpu-wheels: what the GPU image lacks, as cp312
# manylinux wheels in .whl/ (run where pip reaches a registry); gpu-check: one table, <= 8 min
# on one H100; without CUDA it runs the CPU-safe rows and SKIPs the rest, saying why.
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-wheels:  # a fresh folder: two versions of one wheel stop the install there
	rm -rf .whl && mkdir -p .whl
	$(GPU_PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl -r requirements/gpu-wheels.txt
	ls .whl/*.whl

gpu-check:
	$(GPU_PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench/results
