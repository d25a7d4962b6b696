"""Scale-out on loopback: one client, three workers, round_robin, retries hide a killed worker."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from reference import reference

from roundtrip.client import RoundTripClient
from support.workers import WorkerProcess, metric_value

X = np.array([1.0, 2.0, 3.0], dtype=np.float32)
CASES = [(seed, X * (seed % 5 + 1), 4) for seed in range(40)]
EXPECTED = [reference(*case) for case in CASES]

pytestmark = pytest.mark.slow


ANSWERED = 'roundtrip_requests_total{code="OK",method="RoundTrip"}'


def served(worker: WorkerProcess) -> int:
    """The RoundTrip calls ``worker`` answered OK so far (its self-check not counted)."""
    return int(metric_value(worker.scrape(), ANSWERED, missing=0))


@pytest.fixture
def three_workers() -> Any:
    flags = ("--warmup-shapes", "3:4", "--max-batch-size", "4", "--max-connection-age-s", "5")
    workers = [WorkerProcess(*flags) for _ in range(3)]
    try:
        for worker in workers:
            worker.wait_serving()
        yield workers
    finally:
        for worker in workers:
            worker.kill()


def test_load_spreads_over_all_workers_and_a_killed_one_costs_no_call(
    three_workers: list[WorkerProcess],
) -> None:
    target = "ipv4:" + ",".join(f"127.0.0.1:{w.port}" for w in three_workers)
    done = threading.Event()
    answered = [0]
    lock = threading.Lock()

    def call(client: RoundTripClient, index: int) -> bool:
        case = CASES[index % len(CASES)]
        result = client.round_trip(*case)
        with lock:
            answered[0] += 1
            if answered[0] == 900:
                done.set()
        return bool(np.array_equal(result.as_list(), EXPECTED[index % len(CASES)]))

    with RoundTripClient(target, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, client, i) for i in range(1500)]
        assert done.wait(120)
        os.killpg(three_workers[2].process.pid, signal.SIGKILL)  # mid-load, no drain
        outcomes = [f.result() for f in futures]  # raises if any call failed
    assert all(outcomes), "every answer equals the reference"
    counts = [served(worker) for worker in three_workers[:2]]
    for worker in three_workers[:2]:
        assert worker.terminate() == 0
    # Round robin: each survivor took a real share, and the killed one served the rest.
    assert min(counts) > 1500 * 0.2, counts
    assert sum(counts) < 1500 - 100, counts
