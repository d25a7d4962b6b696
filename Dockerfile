# syntax=docker/dockerfile:1
# The roundtrip worker image. Build: docker build -t roundtrip .
# The install step is the Makefile's (`make setup`, from uv.lock), so what CI
# tests is what the image runs.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install --no-install-recommends -y make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml uv.lock README.md Makefile buf.yaml ./
COPY protos ./protos
COPY client ./client
COPY server ./server
RUN make setup SYNC_FLAGS="--no-dev --no-editable" \
    && rm -rf .tools

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 roundtrip \
    && useradd --system --uid 10001 --gid roundtrip --no-create-home roundtrip
COPY --from=build --chown=root:root /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ROUNDTRIP_HOST=0.0.0.0 \
    ROUNDTRIP_PORT=50051
USER 10001:10001
EXPOSE 50051
STOPSIGNAL SIGTERM
HEALTHCHECK NONE
# exec form: the worker is PID 1's only child-free process and receives SIGTERM itself.
ENTRYPOINT ["/app/.venv/bin/roundtrip-server"]
