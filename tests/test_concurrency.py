"""Many callers at once, each getting exactly its own answer (MLServer#1306, #903, #514)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from reference import reference

from roundtrip.client import AsyncRoundTripClient, RoundTripClient
from support.workers import WorkerProcess

SHAPES = [((3,), 4), ((64,), 64), ((7,), 1), ((1,), 5), ((2, 5), 3), ((3, 1), 4)]

pytestmark = pytest.mark.slow


def case(index: int) -> tuple[int, np.ndarray, int]:
    shape, features = SHAPES[index % len(SHAPES)]
    rng = np.random.default_rng(index)
    return index * 7919 - 500, rng.standard_normal(shape).astype(np.float32), features


def test_concurrent_threads_each_get_their_own_answer(worker: WorkerProcess) -> None:
    cases = [case(i) for i in range(160)]
    expected = [reference(*c) for c in cases]

    def call(index: int) -> list[float]:
        with RoundTripClient(worker.target, timeout=120) as client:
            return client.round_trip(*cases[index]).as_list()

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(call, range(len(cases))))
    for got, want in zip(answers, expected, strict=True):
        assert np.array_equal(got, want)


def test_thousands_of_concurrent_calls_with_mixed_shapes_and_seeds_are_exact(
    worker: WorkerProcess,
) -> None:
    cases = [case(i) for i in range(3000)]
    expected = [reference(*c) for c in cases]

    async def run() -> list[list[float]]:
        # 256 in flight at a time: grpc itself cancels some calls past about a
        # thousand simultaneous streams on one connection, even on an empty handler.
        in_flight = asyncio.Semaphore(256)
        async with AsyncRoundTripClient(worker.target, timeout=120) as client:

            async def call(c: tuple[int, np.ndarray, int]) -> list[float]:
                async with in_flight:
                    return (await client.round_trip(*c)).as_list()

            return list(await asyncio.gather(*(call(c) for c in cases)))

    answers = asyncio.run(run())
    for got, want in zip(answers, expected, strict=True):
        assert np.array_equal(got, want)
