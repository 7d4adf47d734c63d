# The two set-up commands: `make test` and `make demo`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned: torch from PyPI (a CUDA build; it runs on the CPU too) with its matching torchvision.
PINS := torch==2.14.1 torchvision==0.29.1 avalanche-lib==0.6.0

.PHONY: test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) -m avalanche_pcreg.experiments $(DEMO_ARGS)

# `make bench BENCH_ARGS='--device cuda'`: BENCH_ARGS go to every script; BENCH_SCRIPTS picks some of
# penalty importance memory, e.g. the peer table:
# `make bench BENCH_SCRIPTS=importance BENCH_ARGS='--peers --peers-md benchmarks/RESULTS.md'`
bench: $(VENV)/.installed
	set -e; for s in $(or $(BENCH_SCRIPTS),penalty importance memory); do \
		$(PY) benchmarks/bench_$$s.py $(BENCH_ARGS); done

clean:
	rm -rf $(VENV) results .pytest_cache
