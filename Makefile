# The two commands: `make run` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
find_python = $(shell scripts/find_python.sh $(1))
PYTHON ?= $(or $(call find_python,3.11),$(call find_python,3.12),$(call find_python,3.13),$(shell command -v python3))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEPS := pyproject.toml sdk/pyproject.toml constraints.txt

# Every Python version we claim is a version the suite runs on: `make test` runs it under
# PYTHON in .venv, then under each other version listed here in .venv-<version>. One that is
# not installed is skipped with a warning, except in CI, where it is an error.
TEST_PYTHONS ?= 3.11 3.13
MAIN_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
OTHER_PYTHONS := $(filter-out $(MAIN_VERSION),$(TEST_PYTHONS))
MISSING_PYTHONS := $(foreach v,$(OTHER_PYTHONS),$(if $(call find_python,$(v)),,$(v)))
ifneq ($(MISSING_PYTHONS),)
ifeq ($(CI),true)
$(error Python $(MISSING_PYTHONS) not found (looked on PATH and in pyenv); CI tests every version in TEST_PYTHONS)
endif
$(warning Python $(MISSING_PYTHONS) not found: `make test` runs the suite without it)
endif

.PHONY: run test lint typecheck pytest chaos soak proto cards bench clean

# $(1): the virtual environment; $(2): the interpreter that creates it.
define install
	@echo "Setting up $(1) with the pinned packages (the first time takes about a minute)..."
	@test -x $(1)/bin/python || $(2) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip==26.3
	$(1)/bin/python -m pip install --disable-pip-version-check --progress-bar off \
		-c constraints.txt -e ./sdk -e '.[dev]' 2>&1 | { grep --line-buffered -E '^(Collecting|Successfully|ERROR)' || true; }
	@touch $(1)/.installed
endef

$(STAMP): $(DEPS)
	$(call install,$(VENV),$(PYTHON))

.PRECIOUS: .venv-%/.installed  # a stamp, not an intermediate file
.venv-%/.installed: $(DEPS)
	$(call install,.venv-$*,$(call find_python,$*))

run: $(STAMP)
	@echo "In another terminal: export PATH=\"$$PWD/$(BIN):\$$PATH\", then \`soma status\`. Ctrl-C stops everything."
	$(BIN)/python -m examples.run --config soma.toml

test: lint typecheck pytest $(addprefix pytest-,$(filter-out $(MISSING_PYTHONS),$(OTHER_PYTHONS)))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# The suite under another interpreter, such as `make pytest-3.13`.
pytest-%: .venv-%/.installed
	.venv-$*/bin/pytest

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
	rm -rf $(VENV) .venv-* .pytest_cache .mypy_cache .ruff_cache *.egg-info
