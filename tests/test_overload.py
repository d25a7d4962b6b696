"""Overload: past the bounded queue the worker refuses at once, and stays exact for the rest.

Latency under overload is a benchmark figure (bench/overload.py, docs/operations.md),
not a timed assertion; what is checked here is structural: refused calls are
RESOURCE_EXHAUSTED naming the limit, they never entered the queue, nothing
else fails, and every accepted answer is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from reference import reference

from roundtrip.client import AsyncRoundTripClient, ResourceExhaustedError, RoundTripResult
from support.workers import InProcessWorker, metric_value, serving_worker

QUEUE = 4
CALLS = 4000  # well past gRPC core's default of 1000 pending calls, which it would cancel


@pytest.fixture(scope="module")
def small_queue_worker() -> Iterator[InProcessWorker]:
    with serving_worker(
        "--warmup-shapes",
        "256:256",
        "--max-queue-size",
        str(QUEUE),
        "--max-batch-size",
        "1",
        "--audit-fraction",
        "0",
    ) as process:
        yield process


def test_beyond_the_queue_calls_are_refused_and_accepted_ones_stay_exact(
    small_queue_worker: InProcessWorker,
) -> None:
    rng = np.random.default_rng(11)
    inputs = [(seed, rng.standard_normal((64, 256)).astype(np.float32)) for seed in range(8)]
    expected = [reference(seed, x, 256) for seed, x in inputs]

    async def flood() -> list[RoundTripResult | ResourceExhaustedError]:
        async with AsyncRoundTripClient(small_queue_worker.target, timeout=120) as client:

            async def one(index: int) -> RoundTripResult | ResourceExhaustedError:
                seed, x = inputs[index % len(inputs)]
                try:
                    return await client.round_trip(seed, x, 256)
                except ResourceExhaustedError as error:
                    return error

            return await asyncio.gather(*(one(i) for i in range(CALLS)))

    outcomes = asyncio.run(flood())
    refused = [o for o in outcomes if isinstance(o, ResourceExhaustedError)]
    accepted = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, RoundTripResult)]
    assert len(refused) + len(accepted) == CALLS
    assert refused, "4,000 simultaneous calls against a queue of 4 must overflow it"
    assert all("max_queue_size" in str(error) for error in refused)
    assert len(accepted) >= QUEUE
    for index, result in accepted:
        assert result.as_list() == expected[index % len(inputs)].tolist()
    text = small_queue_worker.scrape()
    assert metric_value(text, "roundtrip_queue_wait_seconds_count") == len(
        accepted
    )  # refused: never queued
    code = 'roundtrip_requests_total{code="RESOURCE_EXHAUSTED",method="RoundTrip"}'
    assert metric_value(text, code) == len(refused)
    assert small_queue_worker.health() == health_pb2.HealthCheckResponse.SERVING
