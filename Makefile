# The two commands of the README: `make serve` and `make test`. Everything else is set up by them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
REPO ?= models

.PHONY: install frameworks serve test perf-analyzer bench protos clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | { grep -v 'is ignored' || true; }; exit $${PIPESTATUS[0]}
	# (this machine's pip config names local mirrors that may be absent: their warnings are dropped)
	$(BIN)/python -m pip install -q -e '.[dev,demo]' 2>&1 | { grep -v 'is ignored' || true; }; exit $${PIPESTATUS[0]}
	touch $@

# the framework extras the converters need (torch CPU build, TensorFlow, onnxslim) and Ray Serve: for the tests, not for serving
$(BIN)/.frameworks: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,demo,torch,tensorflow,slim,ray]' 2>&1 | { grep -v 'is ignored' || true; }; exit $${PIPESTATUS[0]}
	touch $@

install: $(BIN)/.installed
frameworks: $(BIN)/.frameworks

## serve the demo model (a digits classifier trained here, exported to ONNX) on 127.0.0.1
serve: install
	$(BIN)/modelserve demo --model-repository $(REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)
	$(BIN)/modelserve serve --model-repository $(REPO) --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

## run the test suite (with Triton's real perf_analyzer when it can be installed; its tests skip otherwise)
test: install frameworks perf-analyzer
	$(BIN)/python -m pytest -q

## Triton's perf_analyzer 2.60 in .bench/tools/pa (PyPI wheel + Debian trixie's loader; see ../shared/bench); best effort
PA_SETUP ?= ../shared/bench/tools/setup_perf_analyzer.sh
perf-analyzer: install
	@if [[ -x .bench/tools/pa/perf_analyzer ]]; then exit 0; fi; \
	if [[ ! -f $(PA_SETUP) ]]; then echo "no $(PA_SETUP): perf_analyzer tests will skip"; exit 0; fi; \
	mkdir -p .bench/tools && cp $(PA_SETUP) .bench/tools/ && \
	PY=$(BIN)/python timeout 900 bash .bench/tools/setup_perf_analyzer.sh \
	  || echo "perf_analyzer could not be installed: its tests will skip"

## perf_analyzer benchmark against Triton, MLServer, KServe (see benchmarks/README.md)
bench: install
	benchmarks/run.sh

## regenerate the gRPC/protobuf code from src/modelserve/server/proto/*.proto
protos: install
	PYTHON=$(BIN)/python scripts/gen_protos.sh

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
