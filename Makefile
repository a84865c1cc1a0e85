# Two entry points on a fresh machine with Python 3.11: `make run` and `make test`.
# Each creates or refreshes the local virtual environment (.venv) first.
# torch 2.13.0 is installed on its own first so pip takes the local CPU build
# instead of resolving the newest CUDA build (see docs/architecture.md#environment).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.advsentry-installed
PYTEST_ARGS ?=

.PHONY: run test venv clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The main job: the sidecar in front of an embedded real Triton hosting the bundled
# EfficientNet-Lite0 (gRPC :8001, Prometheus metrics :8002). Ctrl-C drains and stops.
run: $(STAMP)
	$(BIN)/advsentry serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
