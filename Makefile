# Everything installs into a virtualenv of its own (.venv here, or VENV=...), created from
# nothing on first use, so the two README commands work on a machine with only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch goes in first: a bare `torch` requirement would pull CUDA wheels.
TORCH_VERSION ?= 2.13.0

.PHONY: install install-test test lint proto run

$(PY):
	$(PYTHON) -c 'import sys; sys.exit("moeserve needs Python >= 3.11, this is " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[worker,nixl]'

install-test: install
	$(PY) -m pip install -q -e '.[worker,test,nixl,ray]'

test: install-test
	$(PY) -m ruff check moeserve tests benchmarks
	$(PY) -m pytest -q --timeout=600

lint: $(PY)
	$(PY) -m ruff check moeserve tests benchmarks

proto: $(PY)
	$(PY) -m moeserve.api.generate

# The main job: router + prefill + decode workers on the embedded tiny model (Ctrl-C stops).
run: install
	$(VENV)/bin/moeserve up
