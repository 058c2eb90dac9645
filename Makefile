PY ?= python3
# The CPU build of torch goes in first: a bare `torch` requirement would pull CUDA wheels.
TORCH_VERSION ?= 2.13.0

.PHONY: install install-test test lint proto run

install:
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[nixl]'

install-test: install
	$(PY) -m pip install -q -e '.[test,nixl,ray]'

test: install-test
	$(PY) -m ruff check moeserve tests benchmarks
	$(PY) -m pytest -q --timeout=600

lint:
	$(PY) -m ruff check moeserve tests benchmarks

proto:
	$(PY) -m moeserve.api.generate

# The main job: router + prefill + decode workers on the embedded tiny model (Ctrl-C stops).
run: install
	$(PY) -m moeserve.cli up
