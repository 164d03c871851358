# The two commands of the README: `make serve` and `make test`. Everything else is set up by them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
REPO ?= models

.PHONY: install serve test bench protos clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | { grep -v 'is ignored' || true; }; exit $${PIPESTATUS[0]}
	# (this machine's pip config names local mirrors that may be absent: their warnings are dropped)
	$(BIN)/python -m pip install -q -e '.[dev,demo]' 2>&1 | { grep -v 'is ignored' || true; }; exit $${PIPESTATUS[0]}
	touch $@

install: $(BIN)/.installed

## serve the demo model (a digits classifier trained here, exported to ONNX) on 127.0.0.1
serve: install
	$(BIN)/modelserve demo --model-repository $(REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)
	$(BIN)/modelserve serve --model-repository $(REPO) --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

## run the test suite
test: install
	$(BIN)/python -m pytest -q

## perf_analyzer benchmark against Triton, MLServer, KServe (see benchmarks/README.md)
bench: install
	benchmarks/run.sh

## regenerate the gRPC/protobuf code from src/modelserve/server/proto/*.proto
protos: install
	PYTHON=$(BIN)/python scripts/gen_protos.sh

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
