"""Data flows one way, and each layer imports only what it needs: checked in fresh
interpreters, since an import made by any earlier test would hide a violation here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


SERVER = Path(__file__).resolve().parent.parent / "server" / "roundtrip" / "server"
DOORS = "roundtrip.server.doors"


def imported_modules(path: Path) -> set[str]:
    """The modules ``path`` imports (``from a import b`` counts ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_name(path: Path) -> str:
    return ".".join(("roundtrip", *path.relative_to(SERVER.parent).with_suffix("").parts))


def test_doors_are_siblings_that_only_the_assembly_knows() -> None:
    """No door imports another, and nothing under the doors imports a door (the assembly,
    app.py, is what puts them side by side): every door reaches the worker through the
    pipeline, never through another door."""
    doors = {module_name(path) for path in (SERVER / "doors").glob("[a-z]*.py")}
    assert {f"{DOORS}.{name}" for name in ("roundtrip", "stream", "v2_grpc", "v2_rest")} <= doors
    for path in SERVER.rglob("*.py"):
        name = module_name(path)
        if name in (f"{DOORS}.__init__", "roundtrip.server.app") or "v2proto" in name:
            continue
        reached = {module for module in imported_modules(path) if module.startswith(DOORS)}
        assert reached <= {DOORS}, f"{name} imports {sorted(reached)}"
