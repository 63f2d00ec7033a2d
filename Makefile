# `make run`, `make test` and `make test-all` set up .venv (pinned by requirements.lock) on first use.
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install browser run test test-all cluster cluster-stop params lint lock

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	touch $@

run: install
	dvc repro

# The browser tests drive Debian's chromium through Playwright, which cannot download a browser
# of its own here.
browser:
	@command -v chromium > /dev/null || (apt-get update -qq && apt-get install -y -qq chromium > /dev/null)

# The fast tier: unit tests and stages run in-process (no training in a subprocess).
test: install browser
	ruff check src tests bench tools
	ruff format --check src tests bench tools
	pytest -m "not slow"

# Everything, the slow end-to-end tests too: what CI runs.
test-all: install browser
	ruff check src tests bench tools
	ruff format --check src tests bench tools
	pytest

# A one-node SLURM cluster and a PostgreSQL server on this machine, as root (docs/scale-out.md);
# the tests start their own.
cluster: install
	python3 tools/local_cluster.py start

cluster-stop:
	python3 tools/local_cluster.py stop

params: install
	cnnpipe params

lint: install
	ruff check --fix src tests bench tools
	ruff format src tests bench tools

# Re-pin every transitive dependency from what .venv holds now.
lock: install
	$(BIN)/python -m pip freeze --exclude-editable > requirements.lock
