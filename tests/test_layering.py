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
        ("roundtrip.server.engine.engine", {"grpc", "google"}),  # the engine knows nothing of gRPC
        ("roundtrip.server.values", {"jax", "jaxlib", "flax", "grpc"}),  # every codec's types
        ("roundtrip.server.numerics.reference", {"grpc", "google"}),
        ("roundtrip.server.ops.metrics", {"jax", "jaxlib", "flax"}),
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

#: The worker's layers, bottom to top: a module imports from its own layer or below, never
#: above (the README's layout lists the same folders). Inside a layer, the import graph has
#: no circle.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ops",),  # metrics, logs, the collector's settings, the event loop: imports nothing
    ("errors", "values", "config", "v2proto"),  # what every layer passes and reads
    ("numerics",),  # the JAX programs and what decides their bits
    ("engine",),  # executables and parameters kept, warm-up, audit
    ("pipeline",),  # checks, the byte budget, turns, batcher, calls
    ("codecs",),  # wire formats to and from the pipeline's values
    ("doors",),  # gRPC and REST, siblings over the pipeline
    ("parts", "app", "__main__"),  # the assembly: what a worker is built from, its lifecycle
)
#: Floors of the module import graph, the ground floor 1 (what imports none of ours).
MOST_FLOORS = 8


def imported_modules(path: Path) -> set[str]:
    """The modules ``path`` imports (``from a import b`` counts ``a`` and ``a.b``), type-only
    imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_name(path: Path) -> str:
    return ".".join(("roundtrip", *path.relative_to(SERVER.parent).with_suffix("").parts))


def layer_of(module: str) -> int:
    """Where ``module`` (``roundtrip.server.x...``) stands in :data:`LAYERS`."""
    top = module.split(".")[2]
    return next(floor for floor, names in enumerate(LAYERS) if top in names)


def worker_modules() -> dict[str, set[str]]:
    """Each hand-written module of the worker, and the worker's modules it imports."""
    paths = [path for path in SERVER.rglob("*.py") if "v2proto" not in path.parts]
    names = {module_name(path).removesuffix(".__init__") for path in paths}
    graph = {}
    for path in paths:
        reached = set()
        for imported in imported_modules(path):
            while imported not in names and imported.count(".") > 2:
                imported = imported.rsplit(".", 1)[0]  # a name from a module: the module
            if imported in names and imported != "roundtrip.server":
                reached.add(imported)
        graph[module_name(path).removesuffix(".__init__")] = reached
    return graph


def test_every_folder_is_a_layer_and_the_layers_are_stated() -> None:
    folders = {path.name for path in SERVER.iterdir() if (path / "__init__.py").exists()}
    modules = {path.stem for path in SERVER.glob("*.py") if path.stem != "__init__"}
    assert folders | modules == {name for layer in LAYERS for name in layer}


def test_no_import_runs_back_up_a_layer() -> None:
    """Data flows one way: ops below everything, the assembly on top; a module that needs
    something from a layer above has found a concern in the wrong place."""
    upward = [
        f"{module} -> {imported}"
        for module, reached in worker_modules().items()
        for imported in reached
        if layer_of(imported) > layer_of(module)
    ]
    assert upward == []


def test_the_import_graph_has_no_circle_and_few_floors() -> None:
    graph = worker_modules()
    floors: dict[str, int] = {}

    def floor(module: str, path: tuple[str, ...]) -> int:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module not in floors:
            floors[module] = 1 + max(
                (floor(imported, (*path, module)) for imported in graph[module]), default=0
            )
        return floors[module]

    highest = max(floor(module, ()) for module in graph)
    assert highest <= MOST_FLOORS, sorted(floors.items(), key=lambda item: -item[1])[:5]


def test_doors_are_siblings_that_only_the_assembly_knows() -> None:
    """No door imports another, and nothing outside the doors imports a door but the
    assembly (app.py, which puts them side by side): every door reaches the worker through
    the pipeline, never through another door. What the doors share (the gRPC methods'
    wrapper, listeners, security, the OpenAPI document) imports no door."""
    doors = {f"{DOORS}.{name}" for name in ("roundtrip", "stream", "v2_grpc", "v2_rest")}
    assert all((SERVER / "doors" / f"{door.rsplit('.', 1)[1]}.py").exists() for door in doors)
    for module, reached in worker_modules().items():
        if module in ("roundtrip.server.app", DOORS):
            continue
        assert reached & doors == set(), f"{module} imports {sorted(reached & doors)}"


def test_the_readme_lists_the_layers_in_their_order() -> None:
    """The README's layout names every layer, bottom first, as :data:`LAYERS` does."""
    readme = (SERVER.parents[2] / "README.md").read_text()
    block = readme.split("server/roundtrip/server/ ", 1)[1].split("\nsupport/", 1)[0]
    listed = [
        name.strip().rstrip("/").removesuffix(".py")
        for line in block.splitlines()
        if line.startswith("  ") and not line.startswith("   ")
        for name in line.split("  ")[1].split(",")
    ]
    stated = [name for layer in LAYERS for name in layer if name != "v2proto"]
    assert listed == stated


def test_no_hand_written_module_is_longer_than_a_reader_holds_at_once() -> None:
    """400 lines at most, one subject each: the knob declarations in config.py and the
    generated protobuf code aside."""
    root = Path(__file__).resolve().parent.parent
    generated = ("roundtrip/v1/", "v2proto/")
    too_long = {
        str(path.relative_to(root)): lines
        for folder in ("server", "client", "support", "bench")
        for path in (root / folder).rglob("*.py")
        if not any(part in path.as_posix() for part in generated)
        and path.name != "config.py"
        and (lines := len(path.read_text().splitlines())) > 400
    }
    assert too_long == {}
