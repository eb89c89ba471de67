# make setup | test | demo   — everything runs in .venv with pinned versions (requirements/constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on this machine, never a multi-GB CUDA build.
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
