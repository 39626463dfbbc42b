# The two commands of a fresh machine: `make run` (the main job) and `make test`.
# Both set themselves up first (venv, package, data) when that is missing.

# The newest Python the pins support that is on PATH (`make setup PYTHON=python3.12` to choose).
# (A name that is on PATH but does not run, such as a pyenv shim of a version not selected, is skipped.)
PYTHON ?= $(or $(firstword $(foreach v,3.13 3.12 3.11,$(shell python$(v) -c "" >/dev/null 2>&1 && echo python$(v)))),\
  $(error no python3.13, python3.12 or python3.11 on PATH: install one, or give PYTHON=/path/to/python))
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := data/FashionMNIST/raw/t10k-labels-idx1-ubyte
MODEL  ?= cnn
REGISTER ?= false
UI_PORT  ?= 5000
DOCS_PORT ?= 8000

# One tracking store for every run of the project, with nothing exported: MLflow's own default
# (mlflow.db here, artifacts in mlruns/), which pipeline, mlflow run and mlflow ui all use from this
# folder. MLFLOW_TRACKING_URI, if you set it, wins everywhere.
STORE_URI := $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
# A store left at the old place (mlruns/mlflow.db) moves to the default one first.
ADOPT_OLD_STORE := $(BIN)/python -c "from pipeline.tracking.store import adopt_legacy_store as a; a()"
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-fast test-durations check-python ui screenshots server server-stop postgresql lint docs docs-serve bench \
	bench-avx2 bench-quick clean distclean

setup: $(STAMP) $(DATA)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# uv unpacks torch's 6 GB in a fifth of pip's time, from the same indexes (scripts/uv_install.py);
	# plain pip is the fallback.
	{ $(BIN)/python -m pip install --quiet uv && $(BIN)/python scripts/uv_install.py --quiet -e '.[dev]'; } || \
	  $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Debian's package is the offline source; it is installed only when no source answers.
$(DATA): | $(STAMP)
	$(BIN)/pipeline download || { \
	  echo "Installing Debian's dataset-fashion-mnist package..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist && \
	  $(BIN)/pipeline download; }

run: setup
	$(ADOPT_OLD_STORE)
	$(BIN)/mlflow run . -P model=$(MODEL) -P register=$(REGISTER) --env-manager local

# The tests start a real tracking server on PostgreSQL, so they need the package too.
test: setup postgresql
	$(BIN)/python -m pytest

# The inner loop: every test but the slow ones (real processes, servers, end-to-end runs).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# Refreshes tests/durations.json, from which the test files are ordered on the workers: commit it.
test-durations: setup postgresql
	$(BIN)/python -m pytest --record-durations

# The printed link opens the experiment's runs with the pipeline's columns (test accuracy, parity, ...).
ui: setup
	$(BIN)/pipeline ui-url --host 127.0.0.1 --port $(UI_PORT)
	$(BIN)/mlflow ui --backend-store-uri $(STORE_URI) --host 127.0.0.1 --port $(UI_PORT)

# The pictures of the UI in docs/: a fresh store with a real DNN run and a real CNN run (a few
# minutes of CPU), photographed with Debian's headless Chromium (installed here when missing).
screenshots: setup
	command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }
	$(BIN)/python scripts/screenshots.py

# A tracking server for a team (docs/scaling/server.md), in the background until `make server-stop`.
# DB=sqlite serves the project store; DB=postgresql a cluster of its own in .server/postgresql.
# AUTH=1 puts MLflow's basic-auth login in front (the first start needs MLFLOW_AUTH_ADMIN_PASSWORD).
DB             ?= sqlite
SERVER_HOST    ?= 127.0.0.1
SERVER_PORT    ?= 5050
SERVER_WORKERS ?= 4

server: setup $(if $(filter postgresql,$(DB)),postgresql)
	$(BIN)/pipeline server start --db $(DB) --host $(SERVER_HOST) --port $(SERVER_PORT) \
	  --workers $(SERVER_WORKERS) $(if $(AUTH),--basic-auth)

server-stop: $(STAMP)
	$(BIN)/pipeline server stop

# Debian's PostgreSQL server, installed only when missing.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "Installing Debian's postgresql package..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

# Full mode: every measurement, 3 alternating rounds, a real 5-epoch `mlflow run`, and the recipe
# against the chapter CNN over 3 seeds: about 12 minutes on 2 cores. The tables replace their block
# of docs/performance.md (between the bench:native markers); the page's prose is kept.
bench: setup
	$(BIN)/pipeline bench --docs docs/performance.md

# The same with torch capped at AVX2 (what an AVX2-only CPU would measure): the bench:avx2 block.
bench-avx2: setup
	$(BIN)/pipeline bench --max-cpu-isa avx2 --recipe-seeds 1 --docs docs/performance.md

bench-quick: setup
	$(BIN)/pipeline bench --quick

# An install check for the Pythons the suite does not run on here: pip resolves every pin for
# them without installing (it needs the package index, so it is not part of `make test`).
check-python: $(STAMP)
	$(BIN)/python scripts/install_check.py 3.12 3.13

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link or anchor, or a page
# left out of the nav, fails the build. NO_MKDOCS_2_WARNING quiets Material's banner announcing its
# end of life (May 2027) and its successor, Zensical, on every build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:$(DOCS_PORT)

# What the project and the documented commands leave in the project root (all in .gitignore), and the
# bytecode of the project's own folders: never inside $(VENV) or data/. .server/ stays: a team's runs.
clean:
	rm -rf mlruns mlflow.db mlflow.db.lock mlflow-optuna.db mlartifacts outputs exports predictions.* request.json \
	  site .pytest_cache .ruff_cache build dist *.egg-info
	find . \( -path ./$(VENV) -o -path ./data -o -path ./.git \) -prune -o \
	  -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data
