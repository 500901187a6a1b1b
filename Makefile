# Fresh machine: `make run` (creates .venv, installs, runs Split MNIST EWC) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
# Test processes (pytest-xdist); tests sharing a costly session fixture share one (loadgroup).
WORKERS ?= 2

.PHONY: install run test test-all docs bench bench-peers prepare-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Prepares MNIST first only when no prepared copy is found (that step installs tensorflow-cpu).
run: install
	@$(BIN)/python -m experiments.prepare_data --check >/dev/null 2>&1 || $(MAKE) prepare-data
	$(BIN)/python -m experiments.split_mnist --algo=ewc $(ARGS)

# The linter, then the suite less the `extended` tests (see pyproject.toml); test-all: every test.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup -m "not extended" $(ARGS)

test-all: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup $(ARGS)

# The docs site into site/: the `docs` extra first, then a strict build (any warning fails).
docs: install
	$(BIN)/python -m pip install --quiet -e '.[docs,test]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# Offline: make prepare-data MANUAL_DIR=../shared/data/mnist
prepare-data: install
	$(BIN)/python -m pip install --quiet -e '.[prepare,test]'
	$(BIN)/python -m experiments.prepare_data $(if $(MANUAL_DIR),--manual_dir=$(MANUAL_DIR))

# import_time first: it fails (exit 1, one line) when an import outgrows its budget.
bench: install
	$(BIN)/python -m benchmarks.import_time
	$(BIN)/python -m benchmarks.train_step
	$(BIN)/python -m benchmarks.fisher
	$(BIN)/python -m benchmarks.fisher_conv
	$(BIN)/python -m benchmarks.fisher_models
	$(BIN)/python -m benchmarks.fisher_scale --quick
	$(BIN)/python -m benchmarks.end_to_end
	$(BIN)/python -m benchmarks.memory

bench-peers: install
	bash benchmarks/peers/setup.sh
	$(PYTHON) benchmarks/peers/run.py $(ARGS)

clean:
	rm -rf $(VENV) runs site .pytest_cache
