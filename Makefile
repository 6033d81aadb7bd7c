# Two commands for a new machine (Python 3.11 and pip are all it needs):
#   make demo   - install, start the embedded PostgreSQL, run `dbmigrate upgrade --backup` on the sample schema
#   make test   - install with the dev extras and run the whole test suite against real servers
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/dbmigrate status
	$(BIN)/dbmigrate upgrade --backup --yes
	$(BIN)/dbmigrate check

test: install-dev
	$(BIN)/python -m pytest

bench: install-dev
	$(BIN)/python benchmarks/cli_latency.py
	$(BIN)/python benchmarks/backup_restore.py

clean:
	-$(BIN)/dbmigrate local stop
	rm -rf $(VENV) .dbmigrate
