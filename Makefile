# Two commands for a new machine (Python 3.11 and pip are all it needs):
#   make demo   - install; the local stack (`dbmigrate local up`: PostgreSQL, a Prefect server on port 4200,
#                 or PREFECT_PORT=... where that is taken, blocks, deployments and a worker, all on 127.0.0.1);
#                 then the main job the way operators and the GitHub workflow run it, `prefect deployment run
#                 db-migrate/development --watch`: its outcome, its report, and the UI address where the run
#                 history and artifacts are
#   make test   - install with the dev extras and run the whole test suite against real servers
# make check runs the fast tier (pytest -m "not slow": pure logic and in-process runs against the session's
# PostgreSQL, S3 and Prefect API) in a few minutes; make test runs every test, on TEST_WORKERS xdist workers.
# make e2e runs only the end-to-end test (tests/test_e2e.py: local up, the demo job, the GitHub workflow's step,
# an approval in the Prefect UI in headless Chromium, a scheduled run, local up --fleet, local down);
# its screenshots go to screenshots/.
# make down stops the local stack (worker, Prefect server, PostgreSQL); make clean stops it and removes it all.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE := $(or $(DBMIGRATE_HOME),.dbmigrate)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# make demo PREFECT_PORT=4300: the local Prefect server's port, where 4200 is taken
ifdef PREFECT_PORT
export DBMIGRATE_PREFECT_PORT := $(PREFECT_PORT)
endif

# xdist workers: the tests mostly wait on servers, so more workers than cores pay: on this 2-core machine,
# while other jobs loaded it (load 12), the whole suite took 24.5 min with -n 4 (serially, on CI: 33 min).
# TEST_WORKERS=N to change it.
TEST_WORKERS ?= 4
# --no-loadscope-reorder: the work goes out in the order tests/conftest.py gives it (the longest groups first)
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

.PHONY: demo down check test e2e browser jq install install-dev bench clean

# pip first: the pip Python 3.11 bundles spent over 10 minutes of CPU resolving our dependencies (2026-12-06)
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The project's own bytecode, compiled once: an editable install leaves it to the first import, and where
# PYTHONDONTWRITEBYTECODE is set (as on our CI machines) every process that imports the flows compiled
# them again (0.05-0.1 s of CPU each). make check and make test compile what changed since.
COMPILE := $(BIN)/python -m compileall -q -j 0 dbmigrate flows blocks stack alembic tests benchmarks

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[prefect]'
	$(COMPILE)
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[prefect,dev]'
	$(COMPILE)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The run's report is the newest under the stack's home (the worker's DBMIGRATE_HOME); a second
# demo finds the database at head and its report says noop.
demo: install
	$(BIN)/dbmigrate local up
	@eval "$$($(BIN)/dbmigrate local env)"; \
	outcome=0; $(BIN)/prefect deployment run db-migrate/development --watch --watch-timeout 600 || outcome=$$?; \
	report=$$(ls -t $(STATE)/reports/*.json | head -n 1); \
	echo; echo "report: $${report:-none written}"; [ -z "$$report" ] || cat "$$report"; \
	if grep -qs '"status": "noop"' "$$report"; then echo "nothing pending: the database was already at head"; fi; \
	echo "run history and artifacts: $${PREFECT_API_URL%/api}/runs"; \
	exit $$outcome

down:
	$(BIN)/dbmigrate local down

# Debian's Chromium, for the tests that drive the Prefect UI (tests/support/browser.py). Where it cannot be
# installed (not root, no apt-get) those tests are skipped, saying why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "no Chromium here: the tests that use the Prefect UI will be skipped"

# jq, which the GitHub workflow's steps use (GitHub's ubuntu runners have it) and its tests run.
jq:
	@command -v jq >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null; } || \
	  echo "no jq here: the tests of the GitHub workflow's steps will fail"

check: install-dev jq
	$(COMPILE)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_PARALLEL)

test: install-dev browser jq
	$(COMPILE)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

e2e: install-dev browser
	$(BIN)/python -m pytest tests/test_e2e.py

bench: install-dev
	$(BIN)/python benchmarks/cli_latency.py
	$(BIN)/python benchmarks/alembic_overhead.py
	$(BIN)/python benchmarks/run_overhead.py
	$(BIN)/python benchmarks/backup_restore.py

clean:
	-$(BIN)/dbmigrate local down
	rm -rf $(VENV) .dbmigrate
