# The two commands: `make run` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest chaos soak proto cards bench clean

$(STAMP): pyproject.toml sdk/pyproject.toml constraints.txt
	@echo "Setting up $(VENV) with the pinned packages (the first time takes about a minute)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off \
		-c constraints.txt -e ./sdk -e '.[dev]' 2>&1 | { grep --line-buffered -E '^(Collecting|Successfully|ERROR)' || true; }
	@touch $(STAMP)

run: $(STAMP)
	@echo "In another terminal: export PATH=\"$$PWD/$(BIN):\$$PATH\", then \`soma status\`. Ctrl-C stops everything."
	$(BIN)/python -m examples.run --config soma.toml

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# The attack suites (tests/attack/) at full length: `make test` runs their short versions.
# Each test may take longer than the usual 60 s; the counts are printed at the end and kept
# in .soma/attack-report.json.
chaos: $(STAMP)
	SOMA_ATTACK_SCALE=long $(BIN)/pytest tests/attack --timeout=1800 -q

# Mixed traffic from several runtimes under scheduled faults: `make soak DURATION=10m`.
DURATION ?= 10m
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --duration $(DURATION)

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

cards: $(STAMP)
	$(BIN)/soma cards export

# `soma bench --quick`: every call path beside its bare baseline, about two minutes; the full
# run is `.venv/bin/soma bench --json bench.json --plot bench.png`.
bench: $(STAMP)
	$(BIN)/soma bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
