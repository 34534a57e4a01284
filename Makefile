# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Label Studio (docs/review.md) in its own virtual environment: it pins its own Django stack, kept out of ours
LS_VENV  := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
LS_VERSION := 1.23.2
LOCKS  := -c requirements.lock -c requirements-dev.lock

.PHONY: install labelstudio browser demo test test-fast test-all lint docs lock bench fuzz clean

$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(LOCKS) -e '.[dev]'
	touch $(STAMP)

$(LS_STAMP): requirements-labelstudio.lock
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c requirements-labelstudio.lock \
		'label-studio==$(LS_VERSION)'
	touch $(LS_STAMP)

# Debian's chromium, which the review page's browser test drives (Playwright downloads no browser here)
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

install: $(STAMP)

labelstudio: $(LS_STAMP)

demo: install
	$(BIN)/cnn demo

# ruff (lint and format) and mypy (strict on cnn/)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the documentation site (docs/, MkDocs Material); --strict: a broken link or a page missing from the nav fails
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

# lint, types, the docs and the suite without its slowest end-to-end tier (under 8 minutes on 2 cores)
test: lint docs
	$(BIN)/python -m pytest -q -m "not slowest"

# everything, the slowest tier (whole flows through real servers and the installed command) included: what CI runs
test-all: lint docs browser labelstudio
	$(BIN)/python -m pytest -q

# the edit-test loop: no flow runs, no real servers (about 2 minutes)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

# pin every dependency again from a fresh resolution (see docs/development.md)
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	.lockenv/bin/python deploy/lock.py
	rm -rf .lockenv

# coverage-guided fuzzing (atheris) of the decoder, then of the contract and index loaders, from the seed corpora,
# FUZZ_SECONDS each; findings land in fuzz/findings/ (copy them to fuzz/regressions/, which the suite replays)
FUZZ_SECONDS ?= 300
fuzz: install
	$(BIN)/python fuzz/seeds.py .fuzz/corpus
	mkdir -p fuzz/findings
	$(BIN)/python fuzz/decode_fuzz.py .fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
		-timeout=10 -artifact_prefix=fuzz/findings/
	for target in contract index; do \
		$(BIN)/python fuzz/loaders_fuzz.py $$target .fuzz/$$target -max_total_time=$(FUZZ_SECONDS) \
			-rss_limit_mb=2048 -timeout=10 -artifact_prefix=fuzz/findings/$$target- || exit 1; \
	done

bench: install
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) $(LS_VENV) build *.egg-info
