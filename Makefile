# Quick start: `make demo` (install + main job on real Fashion-MNIST), `make test` (install + tests).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data demo paper test perf gpu-prepare gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

# Real Fashion-MNIST, offline, from Debian (skipped when already installed).
data:
	@[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

demo: install data
	$(BIN)/python -m bench run

paper: install data
	$(BIN)/python -m bench run --preset paper

test: install data
	$(BIN)/python -m pytest -q

perf: install data
	$(BIN)/python -m pytest tests/perf --benchmark-only -p no:randomly -o addopts=""

# The prepared GPU check (scripts/gpu_check.sh; docs/performance.md): gpu-prepare here, gpu-check there.
gpu-prepare: install data
	PY=$(BIN)/python bash scripts/gpu_prepare.sh

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf runs .pytest_cache .benchmarks
