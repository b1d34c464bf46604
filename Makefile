# Two commands on a fresh machine: `make train` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-fast lint format bench readme-table clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)  ## the main job on the bundled digits data
	$(PY) -m mnistlab.train

# One pytest worker per core (pytest-xdist), each pinned to its core by tests/conftest.py; a test
# file's tests stay on one worker, so a module's shared run is made once.
XDIST := -n auto --dist loadfile

test: $(STAMP)  ## the import contract (pyproject.toml), then the whole suite, slow tests included
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) scripts/bench.py

# The README's regularizer table: rerun its sweep, then rewrite the table between its markers
README_SWEEP := outputs/readme/regularizers
readme-table: $(STAMP)
	rm -rf $(README_SWEEP)
	$(PY) -m mnistlab.train -m regularizer=none,l1,l2,dropout,elastic logger=none \
		hydra.sweep.dir=$(README_SWEEP)
	$(PY) -m mnistlab.report $(README_SWEEP) --table --into README.md --block regularizers

clean:
	rm -rf outputs .pytest_cache .ruff_cache
