# `make run`, `make test` and `make test-all` set up .venv (pinned by requirements.lock) on first use.
VENV := .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install debian run test test-all cluster cluster-stop cluster-restart gpu-bundle params lint lock

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	touch $@

run: install
	dvc repro

# Debian's programs the tests drive: chromium, through Playwright, which cannot download a browser
# of its own here, and ab (apache2-utils), the service's load generator.
debian:
	@command -v chromium > /dev/null && command -v ab > /dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium apache2-utils > /dev/null)

# The fast tier: unit tests and stages run in-process (no training in a subprocess).
test: install debian
	ruff check src tests bench tools
	ruff format --check src tests bench tools
	pytest -m "not slow"

# Everything, the slow end-to-end tests too: what CI runs. Two workers, one file each at a time:
# the slow tests wait on servers, SLURM and subprocesses for much of their time.
test-all: install debian
	ruff check src tests bench tools
	ruff format --check src tests bench tools
	pytest -n 2 --dist loadfile --durations=15

# A one-node SLURM cluster, a PostgreSQL server and an S3 bucket on this machine, as root
# (docs/scale-out.md); SERVICES=s3 (or munge, slurm, postgres) for some of them. A stop keeps
# the keys, data and ports, so the next start brings back the same. The tests start their own.
SERVICES ?=
cluster: install
	python3 tools/local_cluster.py start $(SERVICES)

cluster-stop:
	python3 tools/local_cluster.py stop $(SERVICES)

cluster-restart:
	python3 tools/local_cluster.py restart $(SERVICES)

# What bench/gpu_check.sh needs on a GPU machine without network or hydra-core, in bench/gpu/
# (git-ignored, about 20 MB): hydra-core's wheels, the CIFAR-10 images and the tool that repacks
# them. SHARED is where this workplace keeps them.
SHARED ?= ../shared
gpu-bundle: install
	rm -rf bench/gpu && mkdir -p bench/gpu/wheels
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d bench/gpu/wheels \
		hydra-core==1.3.8 omegaconf==2.3.1
	$(BIN)/python -m pip wheel --quiet --no-deps -w bench/gpu/wheels antlr4-python3-runtime==4.9.3
	cp $(SHARED)/data/cifar10-jpeg.tar.gz $(SHARED)/tools/make_cifar10_archive.py bench/gpu/

params: install
	cnnpipe params

lint: install
	ruff check --fix src tests bench tools
	ruff format src tests bench tools

# Re-pin every transitive dependency from what .venv holds now.
lock: install
	$(BIN)/python -m pip freeze --exclude-editable > requirements.lock
