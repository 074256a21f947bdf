# One command each for the demo and the tests; both set up the venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint format demo bench protos clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: lint
	$(BIN)/python -m pytest

# Style is checked, not debated: ruff's formatter and its pycodestyle / pyflakes rules at 120 columns (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/python -m workers.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_speed.py

# Regenerate the gRPC code; tests/test_protos.py fails when the committed code is stale.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/rmm/v1/*.proto

clean:
	rm -rf $(VENV) .cache
