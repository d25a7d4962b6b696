"""Data flows one way, and each layer imports only what it needs: checked in fresh
interpreters, since an import made by any earlier test would hide a violation here."""

from __future__ import annotations

import subprocess
import sys

import pytest


def modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in done.stdout.split()}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("roundtrip.server.engine", {"grpc", "google"}),  # the engine knows nothing of gRPC
        ("roundtrip.server.values", {"jax", "jaxlib", "flax", "grpc"}),  # every codec's types
        ("roundtrip.server.reference", {"grpc", "google"}),
        ("roundtrip.server.metrics", {"jax", "jaxlib", "flax"}),
        ("roundtrip.server.config", {"jax", "jaxlib", "flax", "grpc"}),
        ("roundtrip.client", {"jax", "jaxlib", "flax"}),  # the client nothing of JAX
        ("roundtrip.client.cli", {"jax", "jaxlib", "flax"}),
    ],
)
def test_a_layer_does_not_import_what_it_must_not_know(module: str, forbidden: set[str]) -> None:
    assert modules_after_import(module) & forbidden == set()
