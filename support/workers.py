"""Workers for tests and benchmarks: ``roundtrip-server`` as a subprocess, or the same
assembly (``roundtrip.server.app``) in this process, on port 0, with what it says collected.

A subprocess is for what needs the process boundary (signals, exit codes, drain, RSS,
the CPU pin, packaging); :class:`InProcessWorker` runs the real ``grpc.aio`` server, REST
endpoint and metrics port on an event loop in a thread of this process, so a test pays
no interpreter start and no JAX import. Both expose the same attributes
(``target``, ports, ``events``, ``health()``, ``metric()``, ``terminate()``).

Every worker started here shares one JAX compilation cache when the environment names
one (``ROUNDTRIP_COMPILATION_CACHE_DIR``: the test session sets it), so only the first
worker of a run compiles a given executable.

>>> free_port() > 0
True
>>> metric_value('roundtrip_inflight_requests 2.0\\n', "roundtrip_inflight_requests")
2.0
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 180.0
SERVING = health_pb2.HealthCheckResponse.SERVING

#: Every worker started here listens on free ports, read back from its ``listening`` line.
FREE_PORTS = ("--port", "0", "--metrics-port", "0", "--http-port", "0")
#: What a worker started here gets unless its flags say otherwise: no announce window
#: (the drain's first step; the tests of the drain set their own).
WORKER_DEFAULTS = ("--drain-announce-s", "0")
#: In-process workers also leave this process's garbage collector alone (the worker's
#: ``gc.freeze`` would freeze the test runner's heap); tests of the collector use a process.
IN_PROCESS_DEFAULTS = (*WORKER_DEFAULTS, "--gc-threshold", "0")


def console_script(name: str) -> str:
    """A console script installed beside this interpreter (the project's venv)."""
    return str(Path(sys.executable).parent / name)


def free_port() -> int:
    """A port nothing listens on now (bound to port 0, read back, closed): for tests that
    must name a port before the server starts (restarting a worker on the same one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def metrics_page(metrics_port: int, host: str = "127.0.0.1") -> str:
    """The /metrics page a local worker serves on ``metrics_port`` (at ``host``)."""
    url = f"http://{host}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def metric_value(text: str, sample: str, missing: float | None = None) -> float:
    """``sample``'s value in a scrape; a missing sample fails unless ``missing`` is given."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, flags=re.MULTILINE)
    if match is None:
        assert missing is not None, f"{sample} not in the scrape"
        return missing
    return float(match.group(1))


def health_status(
    target: str, credentials: grpc.ChannelCredentials | None = None, service: str = ""
) -> int:
    """The ``grpc.health.v1`` status a worker at ``target`` reports for ``service``."""
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


class _Served:
    """What both kinds of worker answer from their ports."""

    host: str = "127.0.0.1"
    port: int
    metrics_port: int
    http_port: int
    credentials: grpc.ChannelCredentials | None
    events: list[dict[str, Any]]

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)

    def health(self, service: str = "") -> int:
        return health_status(self.target, self.credentials, service)

    def scrape(self) -> str:
        """The worker's /metrics page."""
        return metrics_page(self.metrics_port, self.host)

    def metric(self, sample: str) -> float:
        """One sample's value from a fresh scrape (0 when the series does not exist yet)."""
        return metric_value(self.scrape(), sample, missing=0.0)

    def event(self, name: str) -> dict[str, Any]:
        """The first log event called ``name``."""
        return next(event for event in self.events if event.get("event") == name)


class ServerProcess(_Served):
    """A server subprocess that logs JSON lines on stderr and says ``listening`` with its
    port (the worker, or the benchmark's comparison servers); its lines are collected."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.credentials = credentials  # for health checks against a TLS worker
        self.events = []
        self.last_lines: deque[str] = deque(maxlen=20)  # what it said last, should it fail
        self._listening = threading.Event()
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.process = subprocess.Popen(
            list(command),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
            start_new_session=True,  # signals go to the group: `make serve` and its worker
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self._wait_listening()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.last_lines.append(line.rstrip()[:1000])
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "non-json", "line": line.rstrip()}
            if not isinstance(event, dict):
                event = {"event": "non-json", "line": line.rstrip()}
            self.events.append(event)
            if event.get("event") == "listening":
                if event.get("host") not in (None, "", "0.0.0.0", "::", "[::]"):
                    self.host = str(event["host"])
                self.port = int(event["port"])
                self.metrics_port = int(event.get("metrics_port") or 0)
                self.http_port = int(event.get("http_port") or 0)
                self._listening.set()
        self._listening.set()  # the process exited: stop waiting for it

    def _wait_listening(self) -> None:
        if not self._listening.wait(STARTUP_TIMEOUT_S) or not self.port:
            self.kill()
            said = "\n".join(self.last_lines)
            raise RuntimeError(f"the server did not start listening; it said last:\n{said}")

    def rss_mib(self) -> float:
        """The process's resident memory now (``VmRSS``)."""
        return self.status_mib("VmRSS")

    def status_mib(self, key: str) -> float:
        """A memory line of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {key}")

    def wait_serving(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited: {list(self.last_lines)[-5:]}")
            if self.health() == SERVING:
                return
            time.sleep(0.1)
        raise RuntimeError("worker never reported SERVING")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to the process group; its exit status."""
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


class WorkerProcess(ServerProcess):
    """A ``roundtrip-server`` subprocess on free ports (``flags`` after the defaults win).

    ``cwd`` and ``env`` start a worker from another tree (``PYTHONPATH`` naming its
    ``client`` and ``server`` folders: the benchmark's baseline).
    """

    def __init__(
        self,
        *flags: str,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        cwd: Path = ROOT,
    ) -> None:
        super().__init__(
            command
            or [sys.executable, "-m", "roundtrip.server", *FREE_PORTS, *WORKER_DEFAULTS, *flags],
            env=env,
            cwd=cwd,
            credentials=credentials,
        )


class _Events(logging.Handler):
    """Collects the worker's log records as the JSON objects its log lines would hold."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__()
        from roundtrip.server.ops.logs import JsonFormatter

        self.setFormatter(JsonFormatter())
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        self._events.append(json.loads(self.format(record)))


class InProcessWorker(_Served):
    """The worker's assembly (``roundtrip.server.app.start``, the code ``roundtrip-server``
    runs) on its own event loop in a thread of this process, listening on free ports.

    Its warm-up runs in the background as in a process: health is NOT_SERVING until
    :meth:`wait_serving` has seen it finish. ``terminate()`` drains it as SIGTERM would
    and returns 0 when every call finished within the grace, 1 when one was cut off. Not for
    the CPU pin (XLA reads its flags once per process) nor anything measured on the process
    (RSS, signals, exit codes).
    """

    def __init__(self, *flags: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        from roundtrip.server import app
        from roundtrip.server.config import WorkerConfig
        from roundtrip.server.ops import eventloop

        self.credentials = credentials
        self.config = WorkerConfig.from_sources(
            ["--host", "127.0.0.1", *FREE_PORTS, *IN_PROCESS_DEFAULTS, *flags],
            os.environ,
        )
        if self.config.xla_cpu_max_isa:
            raise ValueError("xla_cpu_max_isa applies when JAX starts: use a WorkerProcess")
        self.events = []
        self._logger = logging.getLogger("roundtrip")
        self._handler = _Events(self.events)
        self._logger.addHandler(self._handler)
        self._level = self._logger.level
        self._logger.setLevel(self.config.log_level.upper())
        self.loop = eventloop.loop_factory(self.config.event_loop)()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="in-process-worker", daemon=True
        )
        self._thread.start()
        self.stopped = False
        try:
            self.worker = self.run(app.start(self.config))
        except BaseException:
            self._close_loop()
            raise
        self.port = self.worker.port
        self.metrics_port = self.worker.metrics_port
        self.http_port = self.worker.http_port or 0
        self._warming = asyncio.run_coroutine_threadsafe(self.worker.warm_up(), self.loop)

    def run(self, coroutine: Any, timeout: float | None = STARTUP_TIMEOUT_S) -> Any:
        """Run ``coroutine`` on the worker's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def wait_serving(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        self._warming.result(timeout)

    def terminate(self, timeout: float = 60) -> int:
        """Drain and stop the worker (what SIGTERM does): 0 when every open call finished
        within the drain's grace, 1 when the drain cut one off (a drain that fails
        raises). Once stopped, 0."""
        if self.stopped:
            return 0
        self.stopped = True
        try:
            finished = self.run(self.worker.stop(), timeout)
            if not self._warming.done():
                self._warming.cancel()
        finally:
            self._close_loop()
        return 0 if finished else 1

    def kill(self) -> None:
        """Stop it however it is (a test that failed midway)."""
        if not self.stopped:
            try:
                self.terminate()
            except Exception:  # already failing: the test's own error is the one to see
                self._close_loop()

    def _close_loop(self) -> None:
        self.stopped = True
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)


Worker = WorkerProcess | InProcessWorker


W = TypeVar("W", WorkerProcess, InProcessWorker)


@contextmanager
def _serving(worker: W) -> Iterator[W]:
    """``worker`` once it reports SERVING; on leaving, its drain must end with status 0."""
    try:
        worker.wait_serving()
        yield worker
        assert worker.terminate() == 0
    finally:
        worker.kill()


def serving_worker(
    *flags: str, credentials: grpc.ChannelCredentials | None = None
) -> AbstractContextManager[InProcessWorker]:
    """An in-process worker that reports SERVING; on leaving, its drain must end cleanly."""
    return _serving(InProcessWorker(*flags, credentials=credentials))


def serving_process(
    *flags: str,
    credentials: grpc.ChannelCredentials | None = None,
    env: Mapping[str, str] | None = None,
) -> AbstractContextManager[WorkerProcess]:
    """A worker subprocess that reports SERVING; on leaving, SIGTERM must stop it with 0."""
    return _serving(WorkerProcess(*flags, credentials=credentials, env=env))


@contextmanager
def busy_lane(worker: InProcessWorker) -> Iterator[threading.Event]:
    """The worker's compute lane held by a job that waits for the yielded event (set on
    leaving at the latest): requests queue behind it."""
    release = threading.Event()
    [lane] = worker.worker.batcher.lanes
    lane.executor.submit(release.wait, 60)
    try:
        yield release
    finally:
        release.set()
