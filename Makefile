# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench fuzz clean

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

# coverage-guided fuzzing of the decoder (atheris) from the seed corpus for FUZZ_SECONDS; findings land in
# fuzz/findings/ (copy them to fuzz/regressions/, which the suite decodes)
FUZZ_SECONDS ?= 300
fuzz: install
	$(BIN)/python fuzz/seeds.py .fuzz/corpus
	mkdir -p fuzz/findings
	$(BIN)/python fuzz/decode_fuzz.py .fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
		-timeout=10 -artifact_prefix=fuzz/findings/

# the edit-test loop: everything but the slow flow runs and the real-server end-to-end tests (about 2 minutes)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

bench: install
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) build *.egg-info
