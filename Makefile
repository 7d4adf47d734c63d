# The two set-up commands: `make test` and `make demo`. Each creates .venv when it is missing and installs
# this package (editable) with the exact versions of constraints.txt (torch 2.14.1, torchvision 0.29.1,
# avalanche-lib 0.6.0).
#
# Variables (make VAR=value ...):
#   PYTHON           interpreter that creates .venv (default: python3)
#   TORCH_INDEX_URL  an extra package index for torch, e.g. https://download.pytorch.org/whl/cpu for the
#                    CPU-only build (PyPI's torch is a CUDA build of ~3 GB that also runs on the CPU)
#   PIP_ARGS         more arguments for every pip install (e.g. --index-url ...)
#   PYTEST_ARGS      arguments for pytest (e.g. -k plugin, -x)
#   DEMO_ARGS        arguments for the demo (e.g. --quick)
#   BENCH_ARGS       arguments for every benchmark script (e.g. --quick, --device cuda)
#   BASE_PYTHON      check-wheel: a Python that already has torch and avalanche-lib (default: .venv's)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_INDEX_URL ?=
PIP_ARGS ?=
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) $(PIP_ARGS)
BASE_PYTHON ?= $(PY)

.PHONY: test test-fast durations demo bench check-wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-experiments: pyproject.toml constraints.txt | $(PY)
	$(PIP_INSTALL) -e '.[experiments]'
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(PY)
	$(PIP_INSTALL) -e '.[test]'
	touch $@ $(VENV)/.installed-experiments

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Development loop: everything except the tests marked slow (notebooks, subprocess and multi-process runs).
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Measure every test again into tests/durations.json: the slow tier (`-m slow`) is what took > 3 s.
durations: $(VENV)/.installed-test
	$(PY) -m pytest -q --store-durations $(PYTEST_ARGS)

# The repository's experiment harness (pcreg_experiments/, not in the wheel; the same as ./pcreg-compare).
demo: $(VENV)/.installed-experiments
	$(PY) -m pcreg_experiments $(DEMO_ARGS)

# `make bench BENCH_ARGS='--device cuda'`: BENCH_ARGS go to every script; BENCH_SCRIPTS picks some of
# penalty importance memory, e.g. the peer table:
# `make bench BENCH_SCRIPTS=importance BENCH_ARGS='--peers --peers-md benchmarks/RESULTS.md'`
bench: $(VENV)/.installed-experiments
	set -e; for s in $(or $(BENCH_SCRIPTS),penalty importance memory); do \
		$(PY) benchmarks/bench_$$s.py $(BENCH_ARGS); done

# Build the wheel, install it with --no-deps into a fresh venv on top of BASE_PYTHON's torch and
# avalanche-lib, and run the README's usage example there.
check-wheel: $(VENV)/.installed-test
	tools/check_wheel.sh $(BASE_PYTHON)

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis build dist *.egg-info
