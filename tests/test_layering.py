"""Data flows one way, and each layer imports only what it needs: checked in fresh
interpreters, since an import made by any earlier test would hide a violation here."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after_import(module: str) -> set[str]:
    """Every module a fresh interpreter holds after importing ``module``."""
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def modules_after_import(module: str) -> set[str]:
    return {name.split(".")[0] for name in loaded_after_import(module)}


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


def test_the_worker_does_not_load_the_client_library() -> None:
    """What both sides share is in roundtrip.wire; the worker never imports the client."""
    loaded = loaded_after_import("roundtrip.server.app")
    assert "roundtrip.wire.arrays" in loaded
    assert not {name for name in loaded if name.startswith("roundtrip.client")}
