# Two entry points; each creates .venv (Python 3.11) and installs the lock (requirements.txt) and
# this checkout (editable, so `.venv/bin/score-jax` works too) when needed.
#   make run    train + sample the embedded default (configs/default.py) into runs/default
#   make test   the test suite on 8 simulated CPU devices, in up to 4 pytest-xdist workers, without
#               the multi-process tests (`-m multihost`, .ci/run's multihost stage)
#   make test-all   the test suite with the multi-process tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml setup.py | cksum | cut -d' ' -f1)

.PHONY: run test test-all venv
venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "the lock (requirements.txt) is for Python 3.11; set PYTHON=/path/to/python3.11, or pip install . into any Python 3.11-3.13 environment")'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	JAX_PLATFORMS=cpu $(VENV)/bin/python -c 'import logging; logging.basicConfig(level=logging.INFO, format="%(message)s"); from score_jax.cpu import onednn_wgrad as m; print("oneDNN weight gradient:", "built" if m.available() else "unavailable, XLA computes it")'
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(VENV)/bin/python main.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses=4 -m "not multihost" tests $(ARGS)

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses=4 tests $(ARGS)
