# The two commands of a fresh machine: `make run` (the main job) and `make test`.
# Both set themselves up first (venv, package, data) when that is missing.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   := data/FashionMNIST/raw/t10k-labels-idx1-ubyte
MODEL  ?= cnn
REGISTER ?= false
UI_PORT  ?= 5000

# One tracking store for every run of the project: pipeline train, mlflow run and the UI.
export MLFLOW_TRACKING_URI    ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
export MLFLOW_EXPERIMENT_NAME ?= fashion-mnist
export PATH := $(BIN):$(PATH)

.PHONY: setup run test ui screenshots server server-stop postgresql lint bench bench-quick clean distclean

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
	mkdir -p mlruns
	$(BIN)/mlflow run . -P model=$(MODEL) -P register=$(REGISTER) --env-manager local \
	  --experiment-name $(MLFLOW_EXPERIMENT_NAME)

# The tests start a real tracking server on PostgreSQL, so they need the package too.
test: setup postgresql
	$(BIN)/python -m pytest

# The printed link opens the experiment's runs with the pipeline's columns (test accuracy, parity, ...).
ui: setup
	mkdir -p mlruns
	$(BIN)/pipeline ui-url --host 127.0.0.1 --port $(UI_PORT)
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(UI_PORT)

# The README's pictures of the UI: a fresh store with a real DNN run and a real CNN run (a few
# minutes of CPU), photographed with Debian's headless Chromium (installed here when missing).
screenshots: setup
	command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }
	$(BIN)/python scripts/screenshots.py

# A tracking server for a team (README: Scaling out), in the background until `make server-stop`.
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
# against the chapter CNN over 3 seeds: about 12 minutes here.
bench: setup
	$(BIN)/pipeline bench

bench-quick: setup
	$(BIN)/pipeline bench --quick

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

# What the project and the README's commands leave in the project root (all in .gitignore), and the
# bytecode of the project's own folders: never inside $(VENV) or data/. .server/ stays: a team's runs.
clean:
	rm -rf mlruns mlflow.db mlartifacts outputs exports predictions.* request.json \
	  .pytest_cache .ruff_cache build dist *.egg-info
	find . \( -path ./$(VENV) -o -path ./data -o -path ./.git \) -prune -o \
	  -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data
