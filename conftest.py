"""Fixtures that start real workers and real clients (the launchers are in support/workers.py).

At the repository root so the packages' doctests get them too: an example that calls a
worker names ``worker_target``, the address of the session's shared worker.

Every JAX process of the session (this one, and every worker it starts) shares one
persistent compilation cache, in a directory made for the session: only the first worker
of a run compiles a given executable, the others load it (set
``JAX_COMPILATION_CACHE_DIR`` yourself to keep one across runs).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

from roundtrip.client import RoundTripClient
from support.workers import ROOT, WorkerProcess, serving_process

#: Run in their own environments (tritonclient, MLServer), never imported here.
collect_ignore = ["tests/tritonclient", "bench/mlserver"]
sys.path.insert(0, str(ROOT / "tests"))  # tests/reference.py, the eager reference

#: JAX's persistent compilation cache, for every executable however small or quick.
COMPILATION_CACHE = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def pytest_configure(config: pytest.Config) -> None:
    """One compilation cache for the session, before JAX starts anywhere."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        made = tempfile.mkdtemp(prefix="roundtrip-jax-cache-")
        config.stash[_MADE_CACHE] = made
        os.environ["JAX_COMPILATION_CACHE_DIR"] = made
    for name, value in COMPILATION_CACHE.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config: pytest.Config) -> None:
    made = config.stash.get(_MADE_CACHE, None)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


_MADE_CACHE = pytest.StashKey[str]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, so that test processes (``-n``, a file each at a time)
    end together rather than one running a long file alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def worker() -> Iterator[WorkerProcess]:
    """One worker process shared by the contract tests (small batches, short delay)."""
    with serving_process("--max-queue-delay-us", "500", "--warmup-shapes", "3:4") as process:
        yield process


@pytest.fixture(autouse=True)
def _doctest_worker(request: pytest.FixtureRequest, doctest_namespace: dict[str, object]) -> None:
    """A doctest whose examples name ``worker_target`` gets the shared worker's address."""
    examples = getattr(getattr(request.node, "dtest", None), "examples", ())
    if any("worker_target" in example.source for example in examples):
        doctest_namespace["worker_target"] = request.getfixturevalue("worker").target


@pytest.fixture
def client(worker: WorkerProcess) -> Iterator[RoundTripClient]:
    with RoundTripClient(worker.target, timeout=60) as roundtrip_client:
        yield roundtrip_client
