# Two commands for a new user: `make run` and `make test`. Each bootstraps .venv when missing.
#
# CPU-only PyTorch (a much smaller .venv, no CUDA libraries): install torch first from
# PyTorch's CPU wheels, e.g.
#   make run TORCH_PIP="torch --index-url https://download.pytorch.org/whl/cpu"
# TORCH_PIP is passed to `pip install` before fedrac; unset, pip picks torch as usual.
PYTHON ?= python3
TORCH_PIP ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: run test test-fast lint install clean bench-peers blazefl-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_PIP),$(BIN)/python -m pip install --quiet $(TORCH_PIP))
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/fedrac $(ARGS)

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -m "not slow" -q
	$(BIN)/python -m pytest -m slow -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

lint: $(STAMP)
	$(BIN)/python -m ruff check .

# python -m bench's peers: pfl-research in this venv, BlazeFL 2.x in .venv-blazefl (Python 3.12)
PYTHON312 ?= python3.12
bench-peers: $(STAMP)
	$(BIN)/python -m pip install --quiet -r bench/requirements-peers.txt

blazefl-venv:
	$(PYTHON312) -m venv .venv-blazefl
	.venv-blazefl/bin/python -m pip install --quiet 'blazefl>=2,<3' tqdm \
	    "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__.split("+")[0])')"

clean:
	rm -rf $(VENV) outputs multirun
