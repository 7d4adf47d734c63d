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

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_penalty.py
	$(PY) benchmarks/bench_importance.py
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) results .pytest_cache
