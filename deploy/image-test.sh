#!/usr/bin/env bash
# Build the worker image with podman from a debootstrapped Debian base (no
# registry is needed), then run tests/test_image.py against it: read-only,
# uid 10001, SERVING, an exact answer, and `podman stop` under load losing
# nothing. Needs root and Debian's podman, buildah, runc and debootstrap
# (installed here when missing). `make image-test` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/roundtrip-worker:test}
BASE=localhost/roundtrip-base:bookworm
WORK=${IMAGE_TEST_DIR:-/var/tmp/roundtrip-image-test}
CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
# podman here needs Debian's runc and limits it can raise to (see docs/deploy.md).
PODMAN=(podman --runtime runc)
ULIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v runc >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
fi

# The base: Debian bookworm's own Python 3.11 (what python:3.11-slim-bookworm
# gives, from Debian's mirror instead of a registry), with make for `make setup`.
if ! "${PODMAN[@]}" image exists "$BASE"; then
  rm -rf "$WORK" && mkdir -p "$WORK"
  debootstrap --variant=minbase --include=python3,python3-venv,make,ca-certificates \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE"
  rm -rf "$WORK"
fi

"${PODMAN[@]}" build --network host "${ULIMITS[@]}" \
  --build-arg PYTHON_IMAGE="$BASE" \
  --secret id=ca_bundle,src="$CA_BUNDLE" \
  --target cpu -t "$IMAGE" .
"${PODMAN[@]}" image inspect "$IMAGE" --format 'image {{.Id}}: {{.Size}} bytes, user {{.Config.User}}'

ROUNDTRIP_IMAGE="$IMAGE" .venv/bin/pytest -p no:cacheprovider tests/test_image.py
