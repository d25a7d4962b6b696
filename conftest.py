"""Fixtures that start real workers (subprocesses on port 0) and real clients.

At the repository root so the packages' doctests get them too: an example that calls a
worker names ``worker_target``, the address of the session's shared worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from roundtrip.client import RoundTripClient

ROOT = Path(__file__).resolve().parent
#: Runs in tritonclient's own environment (tests/test_tritonclient.py), not imported here.
collect_ignore = ["tests/tritonclient"]
sys.path.insert(0, str(ROOT / "tests"))  # tests/reference.py, the eager reference

STARTUP_TIMEOUT_S = 180.0


def console_script(name: str) -> str:
    """A console script installed beside this interpreter (the project's venv)."""
    return str(Path(sys.executable).parent / name)


class WorkerProcess:
    """A ``roundtrip-server`` subprocess; its JSON log lines are collected as they come."""

    def __init__(
        self,
        *flags: str,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.credentials = credentials  # for health checks against a TLS worker
        self.events: list[dict[str, object]] = []
        self._listening = threading.Event()
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.process = subprocess.Popen(
            command
            or [
                sys.executable,
                "-m",
                "roundtrip.server",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--http-port",
                "0",
                *flags,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
            start_new_session=True,  # signals go to the group: `make serve` and its worker
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self._wait_listening()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "non-json", "line": line.rstrip()}
            self.events.append(event)
            if event.get("event") == "listening":
                self.port = int(event["port"])  # type: ignore[call-overload]
                self.metrics_port = int(event["metrics_port"])  # type: ignore[call-overload]
                self.http_port = int(event.get("http_port") or 0)  # type: ignore[call-overload]
                self._listening.set()
        self._listening.set()  # the worker exited: stop waiting for it

    def _wait_listening(self) -> None:
        if not self._listening.wait(STARTUP_TIMEOUT_S) or not self.port:
            self.kill()
            raise RuntimeError(f"worker did not start listening: {self.events[-5:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)

    def health(self, service: str = "") -> int:
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def scrape(self) -> str:
        """The worker's /metrics page."""
        return metrics_page(self.metrics_port)

    def metric(self, sample: str) -> float:
        """One sample's value from a fresh scrape (0 when the series does not exist yet)."""
        return metric_value(self.scrape(), sample, missing=0.0)

    def rss_mib(self) -> float:
        """The worker's resident memory now (``VmRSS``)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def wait_serving(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited: {self.events[-5:]}")
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise RuntimeError("worker never reported SERVING")

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is not None:  # already stopped (by the test itself)
            return self.process.returncode
        os.killpg(self.process.pid, signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def free_port() -> int:
    """A port nothing listens on now (bound to port 0, read back, closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def metrics_page(metrics_port: int) -> str:
    """The /metrics page a local worker serves on ``metrics_port``."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def metric_value(text: str, sample: str, missing: float | None = None) -> float:
    """``sample``'s value in a scrape; a missing sample fails unless ``missing`` is given."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, flags=re.MULTILINE)
    if match is None:
        assert missing is not None, f"{sample} not in the scrape"
        return missing
    return float(match.group(1))


@contextmanager
def serving_worker(
    *flags: str, credentials: grpc.ChannelCredentials | None = None
) -> Iterator[WorkerProcess]:
    """A worker that reports SERVING; on leaving, SIGTERM must stop it with status 0."""
    process = WorkerProcess(*flags, credentials=credentials)
    try:
        process.wait_serving()
        yield process
        assert process.terminate() == 0
    finally:
        process.kill()


@pytest.fixture(scope="session")
def worker() -> Iterator[WorkerProcess]:
    """One worker shared by the contract tests (small batches, short delay)."""
    with serving_worker("--max-queue-delay-us", "500", "--warmup-shapes", "3:4") as process:
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
