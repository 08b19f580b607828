# Quick start: `make demo` (installs and runs the recall experiment) and `make test` (installs dev extras, runs the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch==2.13.0 is the CPU build on the dev/CI disk; installing it first keeps pip from pulling a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-dev test test-all lint demo bench eval eval-quick report clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[lm]"

install-dev: $(PY)
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev]"

test: install-dev
	$(PY) -m pytest -q -m "not slow"

test-all: install-dev
	$(PY) -m pytest -q

lint: install-dev
	$(PY) -m ruff check .

demo: install
	$(PY) -m mcrnn demo

bench: install
	$(PY) benchmarks/ops.py

# the evaluation sweep behind docs/results.md (hours on 2 cores), then the report from its results
eval: install
	$(PY) -m mcrnn eval all --jobs 2 --threads 1
	$(PY) -m mcrnn report --collect results/eval

# every task on tiny models (minutes): checks the pipeline, the numbers mean nothing
eval-quick: install
	$(PY) -m mcrnn eval all --quick --jobs 2 --threads 1
	$(PY) -m mcrnn report results/eval --quick --out results/eval/quick_report.md

# docs/results.md from the results committed under docs/results
report: install
	$(PY) -m mcrnn report

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
