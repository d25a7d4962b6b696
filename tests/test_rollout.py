"""Rollouts lose nothing: workers restarted one by one under load answer every call OK.

Three workers sit behind one client target (``round_robin`` over their
addresses). On SIGTERM a worker first announces NOT_SERVING while it keeps
answering (``drain_announce_s``), so clients that watch health move away;
only then does it refuse new calls (UNAVAILABLE) and finish the open ones.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from reference import numbers, reference

from roundtrip.client import AsyncRoundTripClient, RoundTripClient, RoundTripError
from roundtrip.client.channel import SERVICE
from roundtrip.client.messages import build_request, parse_response
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.polling import wait_for
from support.workers import WorkerProcess

CASE = (7, np.linspace(-1, 1, 64, dtype=np.float32), 64)
FLAGS = ("--warmup-shapes", "64:64", "--max-batch-size", "8", "--drain-announce-s", "2")

pytestmark = pytest.mark.slow


def start_workers(*ports: int) -> list[WorkerProcess]:
    """Workers on ``ports`` (0: a free one), started together, each SERVING."""
    workers = [WorkerProcess(*FLAGS, "--port", str(port)) for port in ports]
    for worker in workers:
        worker.wait_serving()
    return workers


def restart(worker: WorkerProcess) -> WorkerProcess:
    """SIGTERM, wait for a clean exit, start a new worker on the same port."""
    assert worker.terminate() == 0
    [new] = start_workers(worker.port)
    return new


UNARY_OK = 'roundtrip_requests_total{code="OK",method="RoundTrip"}'


def answered_ok(worker: WorkerProcess) -> int:
    stopped = next(e for e in worker.events if e["event"] == "stopped")
    answered: dict[str, int] = stopped["answered_by_code"]
    assert set(answered) <= {"OK"}, answered
    return answered.get("OK", 0)


@contextmanager
def steady_load(
    call: Callable[[], list[float]], callers: int, pause_s: float = 0.0
) -> Iterator[Counter[str]]:
    """``callers`` threads calling in a loop, each waiting ``pause_s`` after every call;
    yields the outcome counts (live)."""
    expected = reference(*CASE)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                outcome = "ok" if np.array_equal(call(), expected) else "wrong"
            except RoundTripError as error:
                outcome = error.code.name
            except grpc.RpcError as error:
                outcome = error.code().name
            with lock:
                outcomes[outcome] += 1
            stop.wait(pause_s)

    threads = [threading.Thread(target=loop) for _ in range(callers)]
    for thread in threads:
        thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)


@pytest.mark.timeout(600)  # six worker starts, three of them beside the load
def test_rolling_restart_under_load_ends_every_call_ok() -> None:
    workers = start_workers(0, 0, 0)
    target = "ipv4:" + ",".join(w.target for w in workers)
    retired: list[WorkerProcess] = []
    try:
        client = RoundTripClient(target, timeout=60)

        # Paced: unpaced, the callers kept both of CI's cores so busy that each restarted
        # worker's warm-up took over a minute (281 s in all, near the 300 s timeout).
        # Paced, about 800 calls a second still arrive, and a worker that refused them
        # without announcing first is still caught (seen: one call CANCELLED).
        def call() -> list[float]:
            return client.round_trip(*CASE).as_list()

        with client, steady_load(call, 12, pause_s=0.01) as outcomes:
            wait_for(lambda: outcomes["ok"] >= 100, "the load running")
            for index, worker in enumerate(workers):
                retired.append(worker)
                workers[index] = restart(worker)
                new = workers[index]  # it takes calls before the next one goes
                answering = lambda new=new: new.metric(UNARY_OK) > 0  # noqa: E731
                wait_for(answering, "the new worker answering")
            before_last = outcomes["ok"]
            wait_for(lambda: outcomes["ok"] > before_last + 100, "answers after the rollout")
        for worker in workers:
            assert worker.terminate() == 0
            retired.append(worker)
    finally:
        for worker in workers + retired:
            worker.kill()
    assert set(outcomes) == {"ok"}, outcomes
    served = [answered_ok(worker) for worker in retired]
    assert all(count > 0 for count in served), served  # every worker took part
    assert sum(served) == outcomes["ok"]  # nothing answered twice, nothing lost


def test_non_retrying_client_sees_no_error_across_a_sigterm() -> None:
    workers = start_workers(0, 0)
    target = "ipv4:" + ",".join(w.target for w in workers)
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
    }
    options = [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 0)]
    request = build_request(*CASE)
    try:
        with grpc.insecure_channel(target, options) as channel:
            stub = pb_grpc.RoundTripServiceStub(channel)

            def call() -> list[float]:
                return parse_response(stub.RoundTrip(request, timeout=60)).as_list()

            with steady_load(call, 8) as outcomes:
                wait_for(lambda: outcomes["ok"] >= 100, "the load running")
                assert workers[0].terminate() == 0
                after = outcomes["ok"]
                wait_for(lambda: outcomes["ok"] > after + 50, "answers after the first stopped")
        assert workers[1].terminate() == 0
    finally:
        for worker in workers:
            worker.kill()
    assert set(outcomes) == {"ok"}, outcomes
    assert answered_ok(workers[0]) > 0
    assert answered_ok(workers[1]) > 0


def test_a_stream_on_a_draining_worker_goes_on_elsewhere_with_every_answer() -> None:
    """The worker answers what it read and ends the stream; the client resends the rest."""
    workers = start_workers(0, 0)
    target = "ipv4:" + ",".join(w.target for w in workers)
    count = 4000
    expected = reference(*CASE)
    outcomes: list[object] = []

    def requests() -> Iterator[tuple[int, np.ndarray, int]]:
        for _ in range(count):
            time.sleep(0.001)  # a steady stream of several seconds
            yield CASE

    def consume() -> None:
        with RoundTripClient(target, timeout=120) as client:
            outcomes.extend(client.stream(requests()))

    streaming = threading.Thread(target=consume)
    streamed = 'roundtrip_requests_total{code="OK",method="RoundTripStream"}'
    try:
        streaming.start()
        wait_for(lambda: any(w.metric(streamed) > 0 for w in workers), "the stream answering")
        [holder] = [w for w in workers if w.metric(streamed) > 0]
        assert holder.terminate() == 0  # announce, then end the stream mid-way
        streaming.join(120)
        other = next(w for w in workers if w is not holder)
        assert other.metric(streamed) > 0  # the rest went to the other worker
        assert other.terminate() == 0
    finally:
        for worker in workers:
            worker.kill()
    assert len(outcomes) == count
    refused = [str(o) for o in outcomes if isinstance(o, RoundTripError)]
    assert refused == []  # every message the draining worker read was computed, not refused
    assert all(np.array_equal(numbers(o), expected) for o in outcomes)
    drained = next(e for e in holder.events if e["event"] == "drained")
    assert drained["all_finished"] is True


def test_an_async_stream_from_an_async_source_goes_on_elsewhere_with_every_answer() -> None:
    """The asyncio client, fed by an async generator: the same resume, and the request the
    ended stream was waiting for is sent on the new one, not lost."""
    workers = start_workers(0, 0)
    target = "ipv4:" + ",".join(w.target for w in workers)
    count = 3000
    expected = reference(*CASE)

    async def requests() -> AsyncIterator[tuple[int, np.ndarray, int]]:
        for _ in range(count):
            await asyncio.sleep(0.001)  # a steady stream of several seconds
            yield CASE

    async def consume() -> list[object]:
        async with AsyncRoundTripClient(target, timeout=120) as client:
            return [outcome async for outcome in client.stream(requests())]

    streamed = 'roundtrip_requests_total{code="OK",method="RoundTripStream"}'
    with ThreadPoolExecutor(1) as pool:
        try:
            outcomes_future = pool.submit(asyncio.run, consume())
            streaming = lambda: any(w.metric(streamed) > 0 for w in workers)  # noqa: E731
            wait_for(streaming, "the stream answering")
            [holder] = [w for w in workers if w.metric(streamed) > 0]
            assert holder.terminate() == 0
            outcomes = outcomes_future.result(120)
            other = next(w for w in workers if w is not holder)
            assert other.metric(streamed) > 0
            assert other.terminate() == 0
        finally:
            for worker in workers:
                worker.kill()
    assert len(outcomes) == count
    assert [str(o) for o in outcomes if isinstance(o, RoundTripError)] == []
    assert all(np.array_equal(numbers(o), expected) for o in outcomes)
