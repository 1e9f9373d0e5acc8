# Every target installs what it needs: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(shell find protos -name '*.proto' | sort)

.PHONY: install proto proto-check lint test bench demo up clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

proto: install
	rm -rf generated/devprov
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=generated --pyi_out=generated \
		--grpc_python_out=generated $(PROTOS)

proto-check: install
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=$$tmp --pyi_out=$$tmp \
		--grpc_python_out=$$tmp $(PROTOS) && \
	if diff -r -x __pycache__ $$tmp/devprov generated/devprov; then rm -rf $$tmp; echo "generated/ is up to date"; \
	else rm -rf $$tmp; echo "generated/ is stale: run 'make proto' and commit the result" >&2; exit 1; fi

lint: install
	$(BIN)/ruff check src tests bench

test: proto-check lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
