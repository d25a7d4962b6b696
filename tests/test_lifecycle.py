"""Health transitions, reflection, server info, and a clean exit on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from reference import reference

from roundtrip.client import RoundTripClient, RoundTripResult
from roundtrip.server import app
from roundtrip.server.__main__ import main as server_main
from roundtrip.server.config import WorkerConfig
from roundtrip.server.engine import warmup
from roundtrip.server.ops import eventloop
from roundtrip.server.pipeline.admission import container_memory_limit, default_inflight_bytes
from support.workers import WorkerProcess, serving_process, serving_worker

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.slow
def test_health_is_not_serving_until_warm_up_then_serving() -> None:
    # Several warm-up shapes make the compile phase long enough to observe.
    worker = WorkerProcess("--warmup-shapes", "3:4,64:64,128:32,256:16", "--max-batch-size", "8")
    try:
        assert worker.health() == NOT_SERVING
        assert worker.health("roundtrip.v1.RoundTripService") == NOT_SERVING
        worker.wait_serving()
        assert worker.health("roundtrip.v1.RoundTripService") == SERVING
        events = [e["event"] for e in worker.events]
        assert events.index("warm-up done") < events.index("serving")
        done = next(e for e in worker.events if e["event"] == "warm-up done")
        assert done["self_checked"] >= 5
        assert worker.terminate() == 0
    finally:
        worker.kill()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_exit_zero(signum: signal.Signals) -> None:
    worker = WorkerProcess("--warmup-shapes", "3:4", "--max-batch-size", "2")
    try:
        worker.wait_serving()
        worker.process.send_signal(signum)
        assert worker.process.wait(60) == 0
        events = [e["event"] for e in worker.events]
        assert "draining" in events
        assert "stopped" in events
    finally:
        worker.kill()


def test_startup_logs_backend_devices_and_config(worker: WorkerProcess) -> None:
    starting = next(e for e in worker.events if e["event"] == "starting")
    assert starting["backend"] == "cpu"
    assert starting["devices"]
    assert starting["config"]["max_queue_delay_us"] == 500


def test_the_worker_runs_on_uvloop_by_default(worker: WorkerProcess) -> None:
    starting = next(e for e in worker.events if e["event"] == "starting")
    assert starting["event_loop"] == "uvloop"


def test_once_warm_the_start_up_heap_is_frozen_out_of_the_collector(
    worker: WorkerProcess,
) -> None:
    serving = next(e for e in worker.events if e["event"] == "serving")
    assert serving["gc"]["threshold"] == 10_000
    assert serving["gc"]["frozen"] > 10_000  # JAX alone is more


@pytest.mark.slow
def test_gc_threshold_zero_leaves_the_collector_as_python_set_it() -> None:
    with serving_process("--gc-threshold", "0", "--warmup-shapes", "3:4") as worker:
        serving = next(e for e in worker.events if e["event"] == "serving")
        assert serving["gc"] == {"threshold": 700, "frozen": 0}


def test_event_loop_asyncio_serves_the_same_bits_and_stops_cleanly() -> None:
    # Each test module's workers run on the default (uvloop); this one on the fallback.
    with serving_worker("--event-loop", "asyncio", "--warmup-shapes", "3:4") as worker:
        starting = next(e for e in worker.events if e["event"] == "starting")
        assert starting["event_loop"] == "asyncio"
        x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
        with RoundTripClient(worker.target, timeout=60) as client:
            answers = client.round_trip_many([(seed, x, 4) for seed in range(4)])
        for seed, answer in enumerate(answers):
            assert isinstance(answer, RoundTripResult)
            assert np.array_equal(answer.as_list(), reference(seed, x, 4))


def test_without_uvloop_the_worker_stops_with_status_two_and_names_the_fallback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(eventloop, "available", lambda name: name == "asyncio")
    assert server_main(["--port", "0"]) == 2
    assert "set event_loop = asyncio" in capsys.readouterr().err


def test_reflection_lists_the_services(worker: WorkerProcess) -> None:
    with grpc.insecure_channel(worker.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"roundtrip.v1.RoundTripService", "grpc.health.v1.Health"} <= services
        method = database.FindFileContainingSymbol("roundtrip.v1.RoundTripService")
        assert method.name == "roundtrip/v1/roundtrip.proto"


def test_server_info_reports_versions_backend_and_limits(client: RoundTripClient) -> None:
    info = client.server_info()
    assert info.jax_version == "0.10.2"
    assert info.flax_version == "0.12.8"
    assert info.backend == "cpu"
    assert info.devices
    assert not info.x64_enabled
    assert info.limits.max_features == 65536
    assert info.limits.max_message_bytes == 64 * 1024 * 1024
    assert info.limits.max_param_bytes == 256 * 1024 * 1024
    # resolved from this container's memory limit (2 GiB where there is none)
    expected = default_inflight_bytes(container_memory_limit())
    assert info.limits.max_inflight_bytes == expected


@pytest.mark.slow
def test_persistent_compilation_cache_is_written_and_reused(tmp_path: Path) -> None:
    flags = (
        "--warmup-shapes",
        "3:4",
        "--max-batch-size",
        "2",
        "--compilation-cache-dir",
        str(tmp_path),
    )
    entries = []
    for _ in range(2):  # the second start loads what the first one wrote
        worker = WorkerProcess(*flags)
        try:
            worker.wait_serving()
            with RoundTripClient(worker.target) as client:
                assert client.round_trip(0, [1.0, 2.0, 3.0], 4).orig_sum == -4.221933364868164
            assert worker.terminate() == 0
        finally:
            worker.kill()
        entries.append(sorted(path.name for path in tmp_path.rglob("*")))
    assert entries[0]
    assert entries[1] == entries[0]  # nothing new compiled: every executable came from the cache


@pytest.mark.slow
def test_sigterm_ten_seconds_into_warm_up_stops_within_the_grace() -> None:
    """The pod's grace (terminationGracePeriodSeconds 40) bounds it; the worker looks at its
    stop flag between every two warm-up steps (compilations, self-check inputs, probes), and
    says where warm-up is as it goes: after each shape, and in a heartbeat line every few
    seconds naming the step each lane is in."""
    many_shapes = ",".join(f"{width}:{width + 1}" for width in range(2, 40))
    worker = WorkerProcess("--warmup-shapes", many_shapes)  # about 450 compilations
    try:
        started = time.monotonic()
        progress: list[dict[str, object]] = []
        beats: list[dict[str, Any]] = []
        while time.monotonic() - started < 10 or not (progress and beats):  # 10 s in
            assert worker.process.poll() is None
            assert time.monotonic() - started < 180, "warm-up never said where it is"
            progress = [e for e in worker.events if e["event"] == "warm-up: compiled"]
            beats = [e for e in worker.events if e["event"] == "warming up"]
            time.sleep(0.2)
        assert worker.health() == NOT_SERVING
        assert {"shape", "shapes", "seconds"} <= set(progress[-1])
        [(lane, now)] = beats[-1]["lanes"].items()
        assert now["step"].startswith("compiling "), (lane, now)
        assert isinstance(now["seconds"], float)  # how long it has been in that step
        times = [logged_at(event) for event in worker.events if "ts" in event]
        assert max(later - sooner for sooner, later in itertools.pairwise(times)) <= 10
        signalled = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(40) == 0
        assert time.monotonic() - signalled < 40
        assert "stopped" in [e["event"] for e in worker.events]
        assert "warm-up done" not in [e["event"] for e in worker.events]
    finally:
        worker.kill()


@pytest.mark.slow
def test_a_port_another_worker_serves_on_stops_the_second_with_status_two(
    worker: WorkerProcess,
) -> None:
    """grpcio would share the port (SO_REUSEPORT) and split traffic with a stale worker."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "roundtrip.server",
            "--port",
            str(worker.port),
            "--metrics-port",
            "0",
            "--http-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"127.0.0.1:{worker.port}" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("taken", ["--port", "--metrics-port"])
def test_a_taken_port_stops_the_worker_with_status_two_and_says_which(taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        flags = {"--port": "0", "--metrics-port": "0", taken: str(port)}
        done = subprocess.run(
            [sys.executable, "-m", "roundtrip.server", *(x for kv in flags.items() for x in kv)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if not line.startswith("{")] == []
    [refusal] = [json.loads(line) for line in done.stderr.splitlines() if "cannot start" in line]
    assert f"127.0.0.1:{port}" in refusal["event"]
    assert f"choose another {taken}" in refusal["event"]


def logged_at(event: dict[str, Any]) -> float:
    """The time a log line says it was written, in seconds."""
    stamp = datetime.datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00"))
    return stamp.timestamp()


def refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_failed_self_check_closes_every_port_it_opened(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's own serve(): a warm-up whose self-check fails closes the gRPC, REST and
    metrics ports (and the rest of what start opened) before the failure reaches main."""

    def fails(*args: object) -> str:
        raise warmup.SelfCheckFailed("engine and eager reference differ (forced by the test)")

    monkeypatch.setattr(warmup, "warm_up", fails)
    caplog.set_level(logging.INFO, logger="roundtrip")
    config = WorkerConfig.from_sources(
        ["--port", "0", "--metrics-port", "0", "--http-port", "0", "--gc-threshold", "0"], {}
    )
    threads = set(threading.enumerate())
    with pytest.raises(warmup.SelfCheckFailed):
        asyncio.run(app.serve(config))
    [listening] = [record for record in caplog.records if record.getMessage() == "listening"]
    ports = [listening.port, listening.metrics_port, listening.http_port]  # type: ignore[attr-defined]  # extra= fields
    assert all(ports)
    assert all(refuses_connections(port) for port in ports), ports
    assert not [t.name for t in set(threading.enumerate()) - threads if t.name == "metrics-http"]


def test_a_failed_self_check_exits_three() -> None:
    code = (
        "import sys; from roundtrip.server import __main__\n"
        "from roundtrip.server.engine import warmup\n"
        "def fails(*args): raise warmup.SelfCheckFailed('forced by the test')\n"
        "warmup.warm_up = fails\n"
        "sys.exit(__main__.main(['--port', '0', '--metrics-port', '0', '--http-port', '0']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "self-check failed; refusing to serve" in done.stderr
