# flexdit-train developer commands. `make help` lists them.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-fast train pretrain lint clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install the package with its dev extras (idempotent)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install ## Run the whole test suite on CPU (slow end-to-end tests included)
	$(PY) -m pytest

test-fast: install ## Run the test suite without the slow end-to-end tests
	$(PY) -m pytest -m "not slow"

train: install ## The embedded demo: flexify the shipped MNIST teacher, evaluate it under compute budgets (CPU); ARGS="..."
	$(PY) -m flexdit_train.demo $(ARGS)

pretrain: install ## Retrain the shipped MNIST teacher (CPU, ~1 h) and rewrite flexdit_train/assets/ with its card
	$(PY) -m flexdit_train.demo stage=pretrain $(ARGS)

lint: install ## Lint with ruff
	$(VENV)/bin/ruff check flexdit_train tests benchmarks scripts

clean: ## Remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs multirun
