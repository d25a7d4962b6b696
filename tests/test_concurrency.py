"""Many callers at once, each getting exactly its own answer (MLServer#1306, #903, #514)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import WorkerProcess
from reference import reference

from roundtrip.client import AsyncRoundTripClient, RoundTripClient

SHAPES = [(3, 4), (64, 64), (7, 1), (1, 5)]


def case(index: int) -> tuple[int, np.ndarray, int]:
    width, features = SHAPES[index % len(SHAPES)]
    rng = np.random.default_rng(index)
    return index * 7919 - 500, rng.standard_normal(width).astype(np.float32), features


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


def test_concurrent_asyncio_calls_on_one_channel_are_batched_and_exact(
    worker: WorkerProcess,
) -> None:
    cases = [case(i) for i in range(400)]
    expected = [reference(*c) for c in cases]

    async def run() -> list[list[float]]:
        async with AsyncRoundTripClient(worker.target, timeout=120) as client:
            results = await asyncio.gather(*(client.round_trip(*c) for c in cases))
        return [r.as_list() for r in results]

    answers = asyncio.run(run())
    for got, want in zip(answers, expected, strict=True):
        assert np.array_equal(got, want)
