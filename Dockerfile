# syntax=docker/dockerfile:1
# The roundtrip worker image, one target per variant (plain named stages, so
# BuildKit, buildah and podman all select them the same way):
#   docker build -t roundtrip-worker:0.1.0 .                            CPU (the default, last stage)
#   docker build --target cuda -t roundtrip-worker:0.1.0-cuda .         NVIDIA GPU
# The install step is the Makefile's own `make setup`, from uv.lock, so what
# CI tests is what the image runs. The CUDA variant adds the locked `cuda`
# extra (jax[cuda12]: the CUDA libraries come as wheels); the host's NVIDIA
# driver is mounted by the NVIDIA container runtime.
# Behind a TLS-intercepting proxy, hand the build your CA bundle as a secret:
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt .
# `make image-test` builds and runs it with podman from a debootstrapped base.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS source
RUN apt-get update \
    && apt-get install --no-install-recommends -y make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml uv.lock README.md LICENSE Makefile buf.yaml ./
COPY protos ./protos
COPY client ./client
COPY server ./server

FROM source AS build-cpu
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -f /run/secrets/ca_bundle ]; then \
      export SSL_CERT_FILE=/run/secrets/ca_bundle PIP_CERT=/run/secrets/ca_bundle; \
    fi \
    && make setup SYNC_FLAGS="--no-dev --no-editable" \
    && rm -rf .tools /root/.cache

FROM source AS build-cuda
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -f /run/secrets/ca_bundle ]; then \
      export SSL_CERT_FILE=/run/secrets/ca_bundle PIP_CERT=/run/secrets/ca_bundle; \
    fi \
    && make setup SYNC_FLAGS="--no-dev --no-editable --extra cuda" \
    && rm -rf .tools /root/.cache

FROM ${PYTHON_IMAGE} AS runtime
# The distribution's name and version (client/roundtrip/wire/version.py; a test keeps them equal).
LABEL org.opencontainers.image.title="roundtrip-worker" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 roundtrip \
    && useradd --system --uid 10001 --gid roundtrip --no-create-home roundtrip
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ROUNDTRIP_HOST=0.0.0.0 \
    ROUNDTRIP_PORT=50051 \
    ROUNDTRIP_METRICS_PORT=9464
USER 10001:10001
# gRPC, and Prometheus metrics at /metrics.
EXPOSE 50051 8000 9464
STOPSIGNAL SIGTERM
# Exec form: the worker is PID 1 and receives SIGTERM itself, then drains.
ENTRYPOINT ["/app/.venv/bin/roundtrip-server"]

FROM runtime AS cuda
COPY --from=build-cuda /app/.venv /app/.venv
# No timing-based kernel choice: the same bits from every process (docs/operations.md#numerics).
ENV JAX_PLATFORMS=cuda \
    XLA_FLAGS=--xla_gpu_autotune_level=0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime AS cpu
COPY --from=build-cpu /app/.venv /app/.venv
ENV JAX_PLATFORMS=cpu
