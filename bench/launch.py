"""The servers a benchmark runs (:func:`launched`): the worker (``roundtrip-server``,
through ``support.workers``, the tests' own launcher; from another commit's tree with
:func:`worktree`), the empty grpc.aio handler, the naive eager server and the engine under
the thinnest handler (``bench/servers.py``), and MLServer from its own environment
(``bench/mlserver``); and the worker's own counters read around a load (:func:`codes`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.otlp import Collector
from support.workers import (
    ROOT,
    ServerProcess,
    WorkerProcess,
    free_port,
    metric_value,
    metrics_page,
)


@dataclass(frozen=True)
class ServerSpec:
    """A server a benchmark starts: ``kind`` is ``worker``, ``empty``, ``naive``,
    ``engine`` or ``mlserver``; a worker takes ``flags`` and ``env``, and ``tree`` (a checkout of
    another commit) runs that commit's worker instead of this one. ``traced``: the worker
    exports its traces over OTLP/gRPC to a collector on loopback that counts them (its
    sampler as ``env`` sets it)."""

    name: str
    kind: str
    flags: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    tree: Path | None = None
    traced: bool = False

    @property
    def computes(self) -> bool:
        """Whether its answers are the computation's (the empty handler's are a constant)."""
        return self.kind != "empty"


@dataclass
class Launched:
    """A running server's ports (``metrics_port`` 0: not the worker) and process."""

    port: int
    http_port: int = 0
    metrics_port: int = 0
    process: ServerProcess | None = None

    def scrape(self) -> str:
        return metrics_page(self.metrics_port) if self.metrics_port else ""


@contextmanager
def launched(spec: ServerSpec) -> Iterator[Launched]:
    """``spec`` started on free ports, yielded once it serves; stopped on leaving."""
    if spec.kind == "mlserver":
        with mlserver() as (grpc_port, http_port):
            yield Launched(grpc_port, http_port)
        return
    if spec.traced:
        with Collector(keep=False) as collector:
            endpoint = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.grpc_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            }
            untraced = dataclasses.replace(spec, traced=False, env={**spec.env, **endpoint})
            with launched(untraced) as running:
                yield running
        return
    process: ServerProcess
    if spec.kind == "worker":
        env = dict(spec.env)
        cwd = ROOT
        if spec.tree is not None:
            cwd = spec.tree
            env["PYTHONPATH"] = f"{spec.tree / 'client'}{os.pathsep}{spec.tree / 'server'}"
        process = WorkerProcess(*spec.flags, env=env, cwd=cwd)
    else:
        process = ServerProcess(
            [sys.executable, "-m", "bench.servers", spec.kind, *spec.flags], env=spec.env
        )
    try:
        if spec.kind == "worker":
            process.wait_serving(1200)
        yield Launched(process.port, process.http_port, process.metrics_port, process)
    finally:
        process.terminate(120)
        process.kill()


@contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """A checkout of ``commit`` in a temporary ``git worktree``, removed on leaving."""
    folder = Path(tempfile.mkdtemp(prefix="roundtrip-baseline-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), commit],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, capture_output=True
        )
        shutil.rmtree(folder, ignore_errors=True)


MLSERVER_ENV = ROOT / ".tools" / "mlserver"


MLSERVER_LOCK = ROOT / "bench" / "mlserver" / "requirements.txt"


def mlserver_executable() -> Path:
    """MLServer's environment, installed from its lock on first use."""
    marker = MLSERVER_ENV / ".synced"
    if not marker.exists() or marker.stat().st_mtime < MLSERVER_LOCK.stat().st_mtime:
        uv = ROOT / ".tools" / "bin" / "uv"
        subprocess.run(
            [str(uv), "venv", "--quiet", "--allow-existing", str(MLSERVER_ENV)], check=True
        )
        python = str(MLSERVER_ENV / "bin" / "python")
        install = [str(uv), "pip", "install", "--quiet", "--python", python]
        subprocess.run([*install, "--require-hashes", "-r", str(MLSERVER_LOCK)], check=True)
        marker.touch()
    return MLSERVER_ENV / "bin" / "mlserver"


@contextmanager
def mlserver() -> Iterator[tuple[int, int]]:
    """MLServer 1.7 serving the same computation (``bench/mlserver/runtime.py``, jitted,
    ``parallel_workers: 0`` so it computes in its server process as the worker does);
    yields (grpc_port, http_port) once its model is ready."""
    executable = mlserver_executable()
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="mlserver-"))
    settings = {"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port}
    settings |= {"metrics_port": metrics_port, "parallel_workers": 0}
    (folder / "settings.json").write_text(json.dumps(settings))
    model: dict[str, Any] = {"name": "roundtrip", "implementation": "runtime.RoundTripRuntime"}
    model["parameters"] = {"extra": {"mode": "jit"}}
    (folder / "model-settings.json").write_text(json.dumps(model))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench" / "mlserver"), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [str(executable), "start", str(folder)],
        env=env,
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        url = f"http://127.0.0.1:{http_port}/v2/models/roundtrip/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("MLServer did not get ready")
            time.sleep(0.5)
        yield grpc_port, http_port
    finally:
        process.terminate()
        process.wait(60)
        shutil.rmtree(folder, ignore_errors=True)


def codes(launched: Launched) -> Counter[str]:
    """The worker's answers so far by status code, over every method (empty: not a worker)."""
    counts: Counter[str] = Counter()
    for match in re.finditer(
        r'^roundtrip_requests_total\{code="(\w+)",method="\w+"\} (\S+)$',
        launched.scrape(),
        flags=re.MULTILINE,
    ):
        counts[match.group(1)] += int(float(match.group(2)))
    return counts


def settled(launched: Launched, timeout_s: float = 60.0) -> None:
    """Wait until the worker holds no call and no queued request: a load's last calls (a
    batch call's items, say) are counted when they end, which can be after the load
    generator has exited; counted late, they would land in the next load's figures."""
    if not launched.metrics_port:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = metric(launched, "roundtrip_inflight_requests")
        if not busy and not metric(launched, "roundtrip_queued_requests"):
            return
        time.sleep(0.1)


def metric(launched: Launched, sample: str) -> float:
    return metric_value(launched.scrape(), sample, missing=0.0) if launched.metrics_port else 0.0
