"""Dynamic batching between the servicer and the engine: requests in, futures out.

Requests queue per :class:`ShapeSignature`. One runner task feeds the engine,
which lives on a single compute thread (JAX work never runs on the event
loop). Whenever the engine is free the runner takes the signature whose head
request is oldest and runs up to ``max_batch_size`` of its requests together;
if the batch is not full it waits at most until the oldest request's arrival
plus ``max_queue_delay_us`` (``time.monotonic``), so the window cannot close
early or stretch. With a delay of 0, batches form from whatever queued while
the previous batch ran.

Every request gets exactly its own answer: the engine's batches are
bit-identical per request (a loop over the batch's requests inside one
executable), and if a batch fails each of its
requests is run again alone, so one failing request never fails its
neighbours. A request whose caller goes away (cancelled, or its deadline
passed) leaves the queue at once; one whose deadline passed unnoticed is
dropped before it reaches the engine.

>>> import numpy as np
>>> from concurrent.futures import ThreadPoolExecutor
>>> async def two_requests() -> list[float]:
...     engine = Engine(max_compiled=4, max_batch_size=2)
...     batcher = Batcher(engine, ThreadPoolExecutor(1), max_batch_size=2,
...                       max_queue_delay_us=1000, max_queue_size=16)
...     batcher.start()
...     x = np.array([1.0, 2.0, 3.0], np.float32)
...     answers = await asyncio.gather(*(batcher.submit(RoundTripInput(seed, x, 4))
...                                      for seed in (0, 0)))
...     await batcher.drain()
...     return [answer.orig_sum for answer in answers]
>>> asyncio.run(two_requests())  # one batch of two, each the same bits as alone
[-4.221933364868164, -4.221933364868164]
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from roundtrip.server.engine import Engine, RoundTripAnswer, RoundTripInput, ShapeSignature
from roundtrip.server.errors import (
    ComputeFailed,
    ComputeOutOfMemory,
    DeadlineExpired,
    QueueFull,
    RequestError,
    ShuttingDown,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Ticket:
    """One queued request: its answer (or error) arrives on ``future``."""

    item: RoundTripInput
    future: asyncio.Future[RoundTripAnswer]
    arrived: float
    deadline: float | None


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What one engine run did, for metrics: size, seconds queued (oldest), seconds computing."""

    signature: ShapeSignature
    size: int
    queue_seconds: Sequence[float]
    compute_seconds: float


Outcome = RoundTripAnswer | RequestError


def _as_request_error(error: Exception) -> RequestError:
    text = f"{type(error).__name__}: {error}"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return ComputeOutOfMemory(f"the engine ran out of memory for this request ({text})")
    return ComputeFailed(f"the engine failed on this request ({text})")


class Batcher:
    """Gathers same-shape requests into engine batches; one batch runs at a time."""

    def __init__(
        self,
        engine: Engine,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        if max_batch_size > engine.max_batch_size:
            raise ValueError("max_batch_size exceeds the engine's largest bucket")
        self._engine = engine
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._queues: dict[ShapeSignature, collections.deque[Ticket]] = {}
        self._queued = 0
        self._arrival = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._accepting = True

    @property
    def queued(self) -> int:
        """Requests waiting for the engine (not counting the batch running now)."""
        return self._queued

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(
        self, item: RoundTripInput, *, deadline: float | None = None
    ) -> RoundTripAnswer:
        """Queue ``item`` and wait for its answer. ``deadline`` is a ``time.monotonic()`` time."""
        pending = self.enqueue(item, deadline=deadline)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self.forget(pending)
            raise

    def enqueue(self, item: RoundTripInput, *, deadline: float | None = None) -> Ticket:
        """Queue ``item`` without waiting; its answer (or error) arrives on ``.future``.

        For callers that queue many requests at once (a RoundTripBatch): no task or
        coroutine per request. A caller that goes away calls :meth:`forget`.
        """
        if not self._accepting:
            raise ShuttingDown("the worker is draining; retry on another worker")
        if self._queued >= self.max_queue_size:
            raise QueueFull(
                f"the worker's queue is full ({self.max_queue_size} requests waiting; "
                "max_queue_size); retry with backoff"
            )
        future: asyncio.Future[RoundTripAnswer] = asyncio.get_running_loop().create_future()
        pending = Ticket(item, future, time.monotonic(), deadline)
        queue = self._queues.setdefault(item.signature, collections.deque())
        queue.append(pending)
        self._queued += 1
        self._arrival.set()
        return pending

    def forget(self, pending: Ticket) -> None:
        """The caller of an :meth:`enqueue` went away: cancel it and take it out of the queue."""
        pending.future.cancel()
        self._forget(pending.item.signature, pending)

    def _forget(self, signature: ShapeSignature, pending: Ticket) -> None:
        """Take a request whose caller went away (cancelled, deadline passed) out of the queue.

        At once, so it stops counting against ``max_queue_size`` and its bytes
        can be freed; a request already taken into a batch is simply not answered.
        """
        queue = self._queues.get(signature)
        if queue is None:
            return
        try:
            queue.remove(pending)
        except ValueError:
            return  # already in a batch
        self._queued -= 1
        if not queue:
            del self._queues[signature]

    async def drain(self) -> None:
        """Stop taking requests, answer every queued one, then stop the runner."""
        self._accepting = False
        self._arrival.set()
        if self._runner is not None:
            await self._runner
            self._runner = None

    async def _run(self) -> None:
        while True:
            if not self._queued:
                if not self._accepting:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            signature = await self._next_signature()
            batch = self._take(signature)
            if batch:
                await self._execute(signature, batch)

    async def _next_signature(self) -> ShapeSignature:
        """The signature of the oldest request, once its batch is full or its window is over."""
        signature = min(self._queues, key=lambda sig: self._queues[sig][0].arrived)
        queue = self._queues[signature]
        window_end = queue[0].arrived + self.max_queue_delay_s
        while len(queue) < self.max_batch_size and self._accepting:
            remaining = window_end - time.monotonic()
            if remaining <= 0:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                break
        return signature

    def _take(self, signature: ShapeSignature) -> list[Ticket]:
        """Pop up to ``max_batch_size`` live requests of ``signature``; fail expired ones."""
        queue = self._queues.get(signature)
        if queue is None:  # every request of it was forgotten while the window was open
            return []
        batch: list[Ticket] = []
        now = time.monotonic()
        while queue and len(batch) < self.max_batch_size:
            pending = queue.popleft()
            self._queued -= 1
            if pending.future.done():
                continue  # cancelled: the caller went away
            if pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(
                    DeadlineExpired("the deadline passed while the request was queued")
                )
                continue
            batch.append(pending)
        if not queue:
            del self._queues[signature]
        return batch

    async def _execute(self, signature: ShapeSignature, batch: list[Ticket]) -> None:
        started = time.monotonic()
        items = [pending.item for pending in batch]
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self._executor, self._compute, items)
        finished = time.monotonic()
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, RequestError):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        if self._on_batch is not None:
            self._on_batch(
                BatchRecord(
                    signature=signature,
                    size=len(batch),
                    queue_seconds=[started - pending.arrived for pending in batch],
                    compute_seconds=finished - started,
                )
            )

    def _compute(self, items: list[RoundTripInput]) -> list[Outcome]:
        """Runs on the compute thread. A failed batch is retried request by request."""
        try:
            return list(self._engine.run(items))
        except Exception as error:
            if len(items) == 1:
                log.warning("compute failed", extra={"error": repr(error)})
                return [_as_request_error(error)]
        outcomes: list[Outcome] = []
        for item in items:
            outcomes.extend(self._compute([item]))
        return outcomes
