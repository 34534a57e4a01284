# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/cnn demo

# ruff (lint and format) and mypy (strict on cnn/), then the whole suite
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# the edit-test loop: everything but the slow flow runs and the real-server end-to-end tests (under 90 s)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

bench: install
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) build *.egg-info
