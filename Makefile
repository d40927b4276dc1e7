# turnout: two commands do all the set-up on a fresh machine.
#   make train   the default job (preset tiny: 2 CPU workers on a local Ray cluster)
#   make test    the whole test suite (unit, distributed, e2e; gpu tests skip without CUDA)
# Both create .venv when missing, install torch only when the venv has none (a user's own
# CUDA build stays), then install this project editable with its dev extras, once.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.turnout-installed
TORCH_VERSION ?= 2.13.0
PRESET ?= tiny
ARGS   ?=
PYTEST_ARGS ?=
TEST_PATHS ?= tests

.PHONY: all setup train test lint typecheck format clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	@if $(BIN)/python -c 'import torch' >/dev/null 2>&1; then \
	  echo "torch already in $(VENV): $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
	  $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

setup: $(STAMP)

train: $(STAMP)
	$(BIN)/turnout train $(PRESET) $(ARGS)

test: $(STAMP)
	@rc=0; $(BIN)/python -m pytest $(TEST_PATHS) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; fi; \
	exit $$rc

lint: $(STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping (turnout.models -> models/), so it
# reads the package through a tree of links laid out as the installed package.
typecheck: $(STAMP)
	@rm -rf .mypy_tree && mkdir -p .mypy_tree/turnout
	@for f in turnout/*.py turnout/config; do ln -s "$$PWD/$$f" .mypy_tree/turnout/; done
	@for d in models parallel trainer launch; do ln -s "$$PWD/$$d" .mypy_tree/turnout/$$d; done
	MYPYPATH=.mypy_tree $(BIN)/mypy -p turnout

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .turnout .turnout_cache .pytest_cache .mypy_tree .mypy_cache
