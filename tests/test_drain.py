"""Graceful drain: SIGTERM under load loses no accepted request, and the worker exits 0."""

from __future__ import annotations

import socket
import threading
from collections import Counter

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from reference import reference

from roundtrip.client import RoundTripClient, RoundTripError
from roundtrip.client.messages import build_request
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.polling import wait_for
from support.workers import WorkerProcess

CASE = (11, np.linspace(-1, 1, 64, dtype=np.float32), 64)

pytestmark = pytest.mark.slow


def test_sigterm_under_load_fails_no_accepted_request() -> None:
    expected = reference(*CASE)
    worker = WorkerProcess(
        "--warmup-shapes", "64:64", "--drain-grace-s", "20", "--drain-announce-s", "1"
    )
    outcomes: Counter[str] = Counter()
    wrong = [0]
    lock = threading.Lock()
    stop = threading.Event()
    try:
        worker.wait_serving()

        def caller() -> None:
            with RoundTripClient(worker.target, timeout=60) as client:
                while not stop.is_set():
                    try:
                        result = client.round_trip(*CASE)
                        outcome = "ok"
                        if not np.array_equal(result.as_list(), expected):
                            with lock:
                                wrong[0] += 1
                    except RoundTripError as error:
                        outcome = error.code.name
                    with lock:
                        outcomes[outcome] += 1
                    if outcome != "ok":
                        return  # the worker is gone or refusing: this caller is done

        callers = [threading.Thread(target=caller) for _ in range(16)]
        for thread in callers:
            thread.start()
        wait_for(lambda: outcomes["ok"] >= 200, "load built up")
        worker.process.send_signal(15)
        assert worker.process.wait(60) == 0
        stop.set()
        for thread in callers:
            thread.join(60)
    finally:
        stop.set()
        worker.kill()
    assert outcomes["ok"] > 100
    assert wrong[0] == 0
    stopped = next(e for e in worker.events if e["event"] == "stopped")
    answered: dict[str, int] = stopped["answered_by_code"]
    # Every request a handler accepted was answered OK (or, arriving after the
    # announce, refused with UNAVAILABLE), and every OK reached its caller.
    assert set(answered) <= {"OK", "UNAVAILABLE"}, answered
    assert answered["OK"] == outcomes["ok"], (answered, outcomes)
    # Nothing is cut off: the only other outcome is the retryable UNAVAILABLE.
    assert set(outcomes) <= {"ok", grpc.StatusCode.UNAVAILABLE.name}, outcomes
    events = [e["event"] for e in worker.events]
    assert events.index("draining") < events.index("refusing") < events.index("drained")
    assert events.index("drained") < events.index("stopped")


def test_calls_during_the_announce_are_answered_then_new_ones_refused() -> None:
    """Health reads NOT_SERVING at once, calls are still answered for the announce, then new
    ones are refused UNAVAILABLE while an open call (here an upload still arriving) finishes."""
    worker = WorkerProcess("--warmup-shapes", "64:64", "--drain-announce-s", "3")
    try:
        worker.wait_serving()
        with RoundTripClient(worker.target, timeout=30) as client:
            client.round_trip(*CASE)
            with socket.create_connection(("127.0.0.1", worker.http_port)) as upload:
                # an open call: its body promised, not yet sent, so the drain waits on it
                upload.sendall(
                    b"POST /v2/models/roundtrip/infer HTTP/1.1\r\nHost: w\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
                )
                worker.process.send_signal(15)
                not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
                wait_for(lambda: worker.health() == not_serving, "health NOT_SERVING", timeout=2)
                # a caller that ignores health is still answered during the announce
                with grpc.insecure_channel(worker.target) as channel:
                    stub = pb_grpc.RoundTripServiceStub(channel)
                    response = stub.RoundTrip(build_request(*CASE), timeout=10)
                    assert [response.orig_sum, response.merged_sum, response.max_abs_diff] == list(
                        reference(*CASE)
                    )
                    refusing = lambda: any(e["event"] == "refusing" for e in worker.events)  # noqa: E731
                    wait_for(refusing, "the announce over", timeout=10)
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.RoundTrip(build_request(*CASE), timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert worker.process.wait(60) == 0
    finally:
        worker.kill()
    [refused_from] = [e for e in worker.events if e["event"] == "refusing"]
    assert refused_from["open_calls"] == 1  # the refusal was met while the upload was open
    drained = next(e for e in worker.events if e["event"] == "drained")
    assert drained["all_finished"] is True  # the upload's caller hung up: nothing cut off
