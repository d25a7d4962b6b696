"""Prometheus metrics on their own port: names, values, and promtool's verdict."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from roundtrip.client import InvalidArgumentError, RoundTripClient
from roundtrip.client.messages import build_request
from roundtrip.server.ops.metrics import METRIC_NAMES
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.polling import stays, wait_for
from support.workers import (
    ROOT,
    WorkerProcess,
    busy_lane,
    metric_value,
    serving_process,
    serving_worker,
)

PROMTOOL = ROOT / ".tools" / "promtool"


def rpc_code(call: grpc.Future[Any]) -> grpc.StatusCode:
    """The status a finished call future ended with (its exception is the call)."""
    error = call.exception()
    assert isinstance(error, grpc.RpcError), error
    return error.code()


@pytest.fixture
def traffic(client: RoundTripClient) -> None:
    for seed in range(5):
        client.round_trip(seed, [1.0, 2.0, 3.0], 4)
    with pytest.raises(InvalidArgumentError):
        client.round_trip(0, [1.0, 2.0, 3.0], 0)
    list(client.stream([(1, [1.0], 2), (2, [1.0], 0)]))


def test_requests_are_counted_by_method_and_code(worker: WorkerProcess, traffic: None) -> None:
    text = worker.scrape()
    assert metric_value(text, 'roundtrip_requests_total{code="OK",method="RoundTrip"}') >= 5
    assert (
        metric_value(text, 'roundtrip_requests_total{code="INVALID_ARGUMENT",method="RoundTrip"}')
        >= 1
    )
    assert metric_value(text, 'roundtrip_requests_total{code="OK",method="RoundTripStream"}') >= 1
    assert (
        metric_value(
            text, 'roundtrip_requests_total{code="INVALID_ARGUMENT",method="RoundTripStream"}'
        )
        >= 1
    )
    assert metric_value(text, 'roundtrip_request_duration_seconds_count{method="RoundTrip"}') >= 6
    assert metric_value(text, "roundtrip_inflight_requests") == 0


def test_engine_and_batching_are_visible(worker: WorkerProcess, traffic: None) -> None:
    text = worker.scrape()
    assert metric_value(text, "roundtrip_batch_size_count") >= 1
    assert metric_value(text, "roundtrip_queue_wait_seconds_count") >= 5
    assert metric_value(text, "roundtrip_compilations_total") >= 1
    assert metric_value(text, "roundtrip_compile_seconds_total") > 0
    assert metric_value(text, "roundtrip_executable_cache_hits_total") >= 1
    assert metric_value(text, "roundtrip_executable_cache_entries") >= 1
    assert metric_value(text, "roundtrip_queued_requests") == 0


def test_the_garbage_collectors_time_is_exported(worker: WorkerProcess, traffic: None) -> None:
    # at least the full collection that freezes the start-up heap once warm-up is done
    text = worker.scrape()
    assert metric_value(text, 'roundtrip_gc_collections_total{generation="2"}') >= 1
    assert metric_value(text, 'roundtrip_gc_seconds_total{generation="2"}') > 0


def test_warm_up_proves_batched_programs_and_the_metric_counts_them(worker: WorkerProcess) -> None:
    """Warm-up compiles every batch size of its shapes: the batched ones are proven first
    (docs/adr/0011), and the outcomes are counted."""
    proven = 'roundtrip_batched_programs_total{outcome="proven"}'
    refused = 'roundtrip_batched_programs_total{outcome="refused"}'
    text = worker.scrape()
    assert metric_value(text, proven) >= 1
    metric_value(text, refused)  # the series is there (how many, this device decides)


def test_every_documented_metric_is_exported(worker: WorkerProcess, traffic: None) -> None:
    text = worker.scrape()
    for name in METRIC_NAMES:
        assert re.search(rf"^# TYPE {name} ", text, re.MULTILINE), name


@pytest.mark.external
def test_promtool_accepts_the_metrics(worker: WorkerProcess, traffic: None) -> None:
    done = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=worker.scrape(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_metric_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = re.findall(r"^\| `(roundtrip_[a-z_]+)` \|", readme, flags=re.MULTILINE)
    assert sorted(documented) == sorted(METRIC_NAMES)


def thread_count(worker: WorkerProcess) -> int:
    status = Path(f"/proc/{worker.process.pid}/status").read_text()
    threads = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
    assert threads is not None, status
    return int(threads.group(1))


@pytest.mark.slow
def test_a_scrape_is_served_at_once_while_slow_clients_hold_every_slot() -> None:
    """Slow clients trickling a request a byte at a time hold every slot: a scrape is still
    served within a second (the slowest gives its slot up), and no client holds one past
    metrics_timeout_s in all (each read used to have its own timeout, so a trickle never
    ended)."""
    flags = ("--warmup-shapes", "3:4", "--metrics-max-connections", "4", "--metrics-timeout-s", "3")
    with serving_process(*flags) as worker:
        before = thread_count(worker)
        slow = [socket.create_connection(("127.0.0.1", worker.metrics_port)) for _ in range(4)]
        try:
            for connection in slow:
                connection.sendall(b"GET /metr")
            wait_for(lambda: thread_count(worker) >= before + 4, "a thread for each slow client")
            started = time.monotonic()
            assert "roundtrip_requests_total" in worker.scrape()
            assert time.monotonic() - started < 1.0
            for _ in range(5):  # trickling under the per-read timeout the old server had
                for connection in slow[1:]:
                    with contextlib.suppress(OSError):
                        connection.sendall(b"i")
                time.sleep(1)  # the attack's pace, not a wait: a byte a second
            slow[-1].settimeout(1)
            assert slow[-1].recv(1) == b""  # closed after 3 s in all
        finally:
            for connection in slow:
                connection.close()


def test_idle_metrics_connections_are_bounded_and_time_out() -> None:
    flags = ("--warmup-shapes", "3:4", "--metrics-max-connections", "4", "--metrics-timeout-s", "1")
    with serving_process(*flags) as worker:
        before = thread_count(worker)
        idle = [socket.create_connection(("127.0.0.1", worker.metrics_port)) for _ in range(16)]
        try:
            # not one thread per idle client
            assert stays(lambda: thread_count(worker) <= before + 4, 0.5), thread_count(worker)
            assert "roundtrip_requests_total" in worker.scrape()  # served once idlers time out
            idle[0].settimeout(10)
            assert idle[0].recv(1) == b""  # the server closed the idle connection
        finally:
            for connection in idle:
                connection.close()


def test_calls_dropped_by_their_deadline_or_their_caller_are_counted_by_that_code() -> None:
    quick = build_request(1, [1.0, 2.0, 3.0], 4)
    counted = 'roundtrip_requests_total{{code="{}",method="RoundTrip"}}'
    with serving_worker("--warmup-shapes", "3:4") as worker, worker.channel() as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)

        def counts(sample: str) -> float:
            return metric_value(worker.scrape(), sample, missing=0)

        with busy_lane(worker):  # the compute thread busy: calls queue
            expiring = [stub.RoundTrip.future(quick, timeout=3) for _ in range(5)]
            cancelled = [stub.RoundTrip.future(quick, timeout=60) for _ in range(5)]
            # cancelled only once the worker holds them: a call cancelled before it arrives
            # is never the worker's to count
            wait_for(lambda: counts("roundtrip_inflight_requests") == 10, "ten calls queued")
            for call in cancelled:
                call.cancel()
            codes = [rpc_code(call) for call in expiring]
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 5
        assert stub.RoundTrip(quick, timeout=30).orig_sum != 0  # and it serves on
        wait_for(lambda: counts(counted.format("CANCELLED")) == 5, "five counted CANCELLED")
        text = worker.scrape()
        assert metric_value(text, counted.format("DEADLINE_EXCEEDED")) == 5
        assert metric_value(text, "roundtrip_queued_requests") == 0
        assert metric_value(text, "roundtrip_inflight_requests") == 0
