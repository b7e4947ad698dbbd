# One-command set-up: `make run` serves, `make test` checks. Both create .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
# The torch the venv gets first. 2.13.0 is a CPU build on this project's machines
# (pip takes it from their disk); elsewhere it is PyPI's. Override at will.
TORCH  ?= torch==2.13.0

.PHONY: venv run test lint bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# `make run`: the service alone (the `service` extra: no torch, no test tools)
$(VENV)/.service: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[service]'
	touch $@

# `make test`: the service, the client distribution (client/) and the dev tools
$(VENV)/.dev: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e ./client -e '.[dev]' '$(TORCH)'
	@# laplace-torch declares torchvision but never imports it; torchmetrics (its
	@# dependency) imports it when present, and PyPI's torchvision does not load
	@# beside a CPU-only torch ("operator torchvision::nms does not exist").
	$(BIN)/pip uninstall --quiet --yes torchvision
	touch $@ $(VENV)/.service

venv: $(VENV)/.dev

run: $(VENV)/.service
	@echo "alignment-planner on http://$(HOST):$(PORT)  (docs: http://$(HOST):$(PORT)/docs, data: $${PLANNER_DATA_DIR:-./data})"
	$(BIN)/python -m app.server --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The plan page's browser test drives Debian's Chromium (nothing downloads a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the browser test will skip (or fail in CI)"

test: lint browser
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m bench.core
	$(BIN)/python -m bench.service
	$(BIN)/python -m bench.formats
	$(BIN)/python -m bench.search
	$(BIN)/python -m bench.cluster

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
