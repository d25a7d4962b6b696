"""The batcher: batching, per-request isolation, queue bound, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from reference import reference

from roundtrip.server.engine.engine import Engine
from roundtrip.server.errors import ComputeFailed, DeadlineExpired, QueueFull, ShuttingDown
from roundtrip.server.pipeline.batcher import Batcher
from roundtrip.server.pipeline.lanes import BatchRecord, Lane
from roundtrip.server.values import RoundTripAnswer, RoundTripInput


class FaultyEngine(Engine):
    """The real engine, made to fail for one seed: the fault injection isolation is about."""

    def run(self, inputs: Sequence[RoundTripInput]) -> list[RoundTripAnswer]:
        if any(item.seed == 666 for item in inputs):
            raise RuntimeError("injected failure")
        return super().run(inputs)


def item(seed: int, width: int = 4) -> RoundTripInput:
    return RoundTripInput(seed, np.linspace(-1, 1, width, dtype=np.float32), 3)


async def with_batcher(
    engine: Engine, body: Callable[[Batcher[Engine]], Awaitable[None]], **options: Any
) -> list[BatchRecord]:
    records: list[BatchRecord] = []
    settings: dict[str, Any] = {
        "max_batch_size": 8,
        "max_queue_delay_us": 20_000,
        "max_queue_size": 100,
    } | options
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher([Lane(engine, executor)], on_batch=records.append, **settings)
        batcher.start()
        try:
            await body(batcher)
        finally:
            await batcher.drain()
    return records


def test_concurrent_requests_form_batches_with_their_own_answers() -> None:
    async def body(batcher: Batcher[Any]) -> None:
        results = await asyncio.gather(*(batcher.submit(item(s)) for s in range(16)))
        for seed, got in enumerate(results):
            want = reference(seed, np.linspace(-1, 1, 4, dtype=np.float32), 3)
            assert np.array_equal([got.orig_sum, got.merged_sum, got.max_abs_diff], want)

    records = asyncio.run(with_batcher(Engine(max_compiled=8, max_batch_size=8), body))
    assert max(r.size for r in records) == 8
    assert sum(r.size for r in records) == 16


def test_one_failing_request_does_not_fail_its_neighbours() -> None:
    async def body(batcher: Batcher[Any]) -> None:
        outcomes = await asyncio.gather(
            *(batcher.submit(item(s)) for s in (1, 666, 2)), return_exceptions=True
        )
        assert isinstance(outcomes[1], ComputeFailed)
        assert "injected failure" in outcomes[1].message
        assert isinstance(outcomes[0], RoundTripAnswer)
        assert isinstance(outcomes[2], RoundTripAnswer)

    asyncio.run(with_batcher(FaultyEngine(max_compiled=8, max_batch_size=8), body))


def test_full_queue_is_refused_at_once() -> None:
    async def body(batcher: Batcher[Any]) -> None:
        waiting = [asyncio.ensure_future(batcher.submit(item(s))) for s in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="max_queue_size"):
            await batcher.submit(item(99))
        await asyncio.gather(*waiting)

    asyncio.run(
        with_batcher(
            Engine(max_compiled=8, max_batch_size=8),
            body,
            max_queue_size=3,
            max_queue_delay_us=200_000,
        )
    )


def test_expired_request_is_dropped_before_the_engine() -> None:
    engine = Engine(max_compiled=8, max_batch_size=8)

    async def body(batcher: Batcher[Any]) -> None:
        with pytest.raises(DeadlineExpired):
            await batcher.submit(item(1), deadline=time.monotonic() + 0.001)

    asyncio.run(with_batcher(engine, body, max_queue_delay_us=50_000))
    assert engine.stats.requests == 0


def test_cancelled_request_is_dropped_and_others_still_answered() -> None:
    engine = Engine(max_compiled=8, max_batch_size=8)

    async def body(batcher: Batcher[Any]) -> None:
        gone = asyncio.ensure_future(batcher.submit(item(1)))
        kept = asyncio.ensure_future(batcher.submit(item(2)))
        await asyncio.sleep(0)
        gone.cancel()
        result = await kept
        assert result.max_abs_diff == 0.0

    asyncio.run(with_batcher(engine, body, max_queue_delay_us=50_000))
    assert engine.stats.requests == 1


def test_batch_window_is_measured_from_the_oldest_request() -> None:
    async def body(batcher: Batcher[Any]) -> None:
        first = asyncio.ensure_future(batcher.submit(item(1)))
        await asyncio.sleep(0.03)
        second = asyncio.ensure_future(batcher.submit(item(2)))
        await asyncio.gather(first, second)

    records = asyncio.run(
        with_batcher(Engine(max_compiled=8, max_batch_size=8), body, max_queue_delay_us=100_000)
    )
    # Both arrive within the oldest request's 100 ms window: one batch.
    assert [r.size for r in records] == [2]


def test_drain_answers_queued_requests_then_refuses_new_ones() -> None:
    async def body(batcher: Batcher[Any]) -> None:
        queued = [asyncio.ensure_future(batcher.submit(item(s))) for s in range(4)]
        await asyncio.sleep(0)
        await batcher.drain()
        assert all(f.done() and not f.exception() for f in queued)
        with pytest.raises(ShuttingDown):
            await batcher.submit(item(9))

    asyncio.run(with_batcher(Engine(max_compiled=8, max_batch_size=8), body))


def test_a_cancelled_request_frees_its_queue_place_at_once() -> None:
    async def body(batcher: Batcher[Any]) -> None:
        gone = [asyncio.ensure_future(batcher.submit(item(s))) for s in range(3)]
        await asyncio.sleep(0)
        assert batcher.queued == 3
        for future in gone:
            future.cancel()
        await asyncio.sleep(0)
        assert batcher.queued == 0  # not when the window ends: now
        result = await batcher.submit(item(7))  # the queue of 3 has room again
        assert result.max_abs_diff == 0.0

    asyncio.run(
        with_batcher(
            Engine(max_compiled=8, max_batch_size=8),
            body,
            max_queue_size=3,
            max_queue_delay_us=200_000,
        )
    )


def test_a_group_no_batch_could_take_is_refused_and_the_queue_moves_on() -> None:
    """A group ticket over ``max_batch_size`` would wait at the head of its queue forever;
    it is refused when queued, and the requests after it are answered."""

    async def body(batcher: Batcher[Any]) -> None:
        group = [item(seed) for seed in range(9)]
        with pytest.raises(ValueError, match="over max_batch_size 8"):
            batcher.enqueue(group[0], group=group)
        assert batcher.queued == 0
        answer = await asyncio.wait_for(batcher.submit(item(1)), 60)
        want = reference(1, np.linspace(-1, 1, 4, dtype=np.float32), 3)
        assert np.array_equal([answer.orig_sum, answer.merged_sum, answer.max_abs_diff], want)

    asyncio.run(with_batcher(Engine(max_compiled=8, max_batch_size=8), body))
