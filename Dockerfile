# syntax=docker/dockerfile:1
# The roundtrip worker image.
#   docker build -t roundtrip:0.1.0 .                                    CPU
#   docker build --build-arg VARIANT=cuda -t roundtrip:0.1.0-cuda .      NVIDIA GPU
# The install step is the Makefile's own `make setup`, from uv.lock, so what
# CI tests is what the image runs. The CUDA variant adds the locked `cuda`
# extra (jax[cuda12]: the CUDA libraries come as wheels); the host's NVIDIA
# driver is mounted by the NVIDIA container runtime.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG VARIANT=cpu

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT
RUN apt-get update \
    && apt-get install --no-install-recommends -y make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml uv.lock README.md Makefile buf.yaml ./
COPY protos ./protos
COPY client ./client
COPY server ./server
RUN extra="" \
    && if [ "$VARIANT" = "cuda" ]; then extra="--extra cuda"; fi \
    && make setup SYNC_FLAGS="--no-dev --no-editable $extra" \
    && rm -rf .tools /root/.cache

FROM ${PYTHON_IMAGE} AS runtime-cpu
ENV JAX_PLATFORMS=cpu

FROM ${PYTHON_IMAGE} AS runtime-cuda
ENV JAX_PLATFORMS=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
RUN groupadd --system --gid 10001 roundtrip \
    && useradd --system --uid 10001 --gid roundtrip --no-create-home roundtrip
COPY --from=build /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ROUNDTRIP_HOST=0.0.0.0 \
    ROUNDTRIP_PORT=50051 \
    ROUNDTRIP_METRICS_PORT=9464
USER 10001:10001
# gRPC, and Prometheus metrics at /metrics.
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
# Exec form: the worker is PID 1 and receives SIGTERM itself, then drains.
ENTRYPOINT ["/app/.venv/bin/roundtrip-server"]
