# Two entry points for a fresh machine: `make serve` and `make test`.
# Everything they need is installed here, from the lock file, into .venv.

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 50051
PROTO_FILES := protos/roundtrip/v1/roundtrip.proto
GEN_DIR := client/roundtrip/v1

.PHONY: setup serve test lint typecheck protolint protos check-protos pytest bench clean

setup: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

# The same install step the Dockerfile runs: the locked server environment.
# The image adds SYNC_FLAGS="--no-dev --no-editable" to leave the dev tools out.
SYNC_FLAGS ?=
$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --extra server $(SYNC_FLAGS)
	touch $@

serve: setup
	exec $(BIN)/roundtrip-server --host $(HOST) --port $(PORT)

test: lint typecheck protolint check-protos pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

protolint: setup
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

# Regenerate the committed stubs (_pb2.py, _pb2_grpc.py and their .pyi).
protos: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=client --grpc_python_out=client \
	  --mypy_out=client --mypy_grpc_out=client $(PROTO_FILES)

# Fails when the committed stubs differ from what protos/ generates.
check-protos: setup
	rm -rf .gen-check && mkdir -p .gen-check
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=.gen-check --grpc_python_out=.gen-check \
	  --mypy_out=.gen-check --mypy_grpc_out=.gen-check $(PROTO_FILES)
	diff -r -x __init__.py -x __pycache__ .gen-check/roundtrip/v1 $(GEN_DIR) \
	  || (echo "stubs in $(GEN_DIR) are stale: run 'make protos'" && exit 1)
	rm -rf .gen-check

pytest: setup
	$(BIN)/pytest

# Run by hand, not in CI: figures go to docs/bench/. Needs h2load (Debian nghttp2-client).
bench: setup
	command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .gen-check .mypy_cache .ruff_cache .pytest_cache
