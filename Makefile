# Two commands on a fresh clone: `make demo` and `make test` (each installs first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench experiment clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench/results
