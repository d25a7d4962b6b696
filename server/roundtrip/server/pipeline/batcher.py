"""Dynamic batching between the pipeline and the engine: requests in, futures out.

Requests queue per :class:`ShapeSignature` (a call of many's as group tickets, each joining
one batch whole). One runner task feeds the compute lanes (:class:`Lane`: an engine on one
device and its one compute thread; JAX work never runs on the event loop). Whenever a lane
is free the runner takes the signature whose head request is oldest and runs up to
``max_batch_size`` of its requests together on that lane; if the batch is not full it
waits at most until the oldest request's arrival plus ``max_queue_delay_us``
(``time.monotonic``), so the window cannot close early or stretch. With a delay of 0,
batches form from whatever queued while the previous batch ran. A signature a lane has
never run is first compiled on the compile thread (``compiler``) while other signatures'
batches run. A batch reserves its computation's bytes before it runs
(:class:`~roundtrip.server.pipeline.admission.ByteBudget`) and, when they do not fit, waits
until bytes come back.

Every request gets exactly its own answer, with eager's bits whatever its batch
(:mod:`~roundtrip.server.engine.engine`); if a batch fails each of its requests is run
again alone, so one failing request never fails its neighbours. A request whose caller
goes away (cancelled, or its deadline passed) leaves the queue at once; one whose deadline
passed unnoticed is dropped before it reaches the engine.

>>> import numpy as np
>>> from concurrent.futures import ThreadPoolExecutor
>>> from roundtrip.server.engine.engine import Engine
>>> async def two_requests() -> list[float]:
...     engine = Engine(max_compiled=4, max_batch_size=2)
...     batcher = Batcher([Lane(engine, ThreadPoolExecutor(1))], max_batch_size=2,
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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic

from roundtrip.server.errors import (
    DeadlineExpired,
    QueueFull,
    ShuttingDown,
)
from roundtrip.server.ops.tracing import Tracing, end_request
from roundtrip.server.pipeline.admission import ByteBudget, Reservation
from roundtrip.server.pipeline.lanes import BatchRecord, EngineT, Lane, WarmSignatures, run_batch
from roundtrip.server.pipeline.tickets import Gathering, Ticket, live, settle_batch
from roundtrip.server.values import RoundTripAnswer, RoundTripInput, ShapeSignature

log = logging.getLogger(__name__)


#: Signatures the batcher remembers a lane has run (it asks the engine beyond them).
WARM_MEMO = 1024


class Batcher(Generic[EngineT]):
    """Gathers same-shape requests into engine batches; each lane runs one batch at a time."""

    def __init__(
        self,
        lanes: Sequence[Lane[EngineT]],
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        budget: ByteBudget | None = None,
        on_batch: Callable[[BatchRecord], None] | None = None,
        compiler: Executor | None = None,
    ) -> None:
        if not lanes:
            raise ValueError("a batcher needs at least one lane")
        if any(max_batch_size > lane.engine.max_batch_size for lane in lanes):
            raise ValueError("max_batch_size exceeds the engine's largest bucket")
        self.lanes = tuple(lanes)
        self._idle: asyncio.Queue[Lane[EngineT]] = asyncio.Queue()
        for lane in self.lanes:
            self._idle.put_nowait(lane)
        self._running: set[asyncio.Task[None]] = set()
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        #: The compile thread: a signature a lane has never run is compiled there, so that
        #: new shapes never hold a lane others' batches need (None: on the lane).
        self.compiler = compiler
        self._compiling: set[tuple[str, ShapeSignature]] = set()
        #: Signatures each lane has run (a memo of ``Engine.knows``, oldest forgotten first).
        self._warm = WarmSignatures(WARM_MEMO)
        #: Called when requests leave the queue for a batch (places come back).
        self.on_taken: Callable[[], None] | None = None
        #: Traces: a batch that computed traced requests gets its span (None: off).
        self.tracing: Tracing | None = None
        self._budget = budget
        self._queues: dict[ShapeSignature, collections.deque[Ticket]] = {}
        self._queued = 0
        self._arrival = asyncio.Event()
        #: When the queue last moved (a batch started or finished, or it was empty); and
        #: the requests taken for a batch that waits for bytes (out of the queue's count).
        self._moved = time.monotonic()
        self._held_back = 0
        self._runner: asyncio.Task[None] | None = None
        self._accepting = True

    @property
    def queued(self) -> int:
        """Requests waiting for the engine (not counting the batch running now)."""
        return self._queued

    def stalled_for(self) -> float:
        """Seconds requests have waited while no batch ran, started or finished (0 while the
        queue moves or is empty): what the worker's watch reads to stop saying SERVING."""
        if self._running or self._compiling or not (self._queued or self._held_back):
            return 0.0
        return time.monotonic() - self._moved

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(
        self, item: RoundTripInput, *, deadline: float | None = None
    ) -> RoundTripAnswer:
        """Queue ``item`` and wait for its answer. ``deadline`` is a ``time.monotonic()`` time."""
        ticket = self.enqueue(item, deadline=deadline)
        try:
            answer: RoundTripAnswer = await ticket.future
            return answer
        except asyncio.CancelledError:
            self.forget(ticket)
            raise

    def enqueue(
        self,
        item: RoundTripInput,
        *,
        deadline: float | None = None,
        gathering: Gathering | None = None,
        held: Reservation | None = None,
        compute_bytes: int = 0,
        group: list[RoundTripInput] | None = None,
    ) -> Ticket:
        """Queue ``item`` without waiting; its answer (or error) arrives on ``.future``.

        For callers that queue many requests at once (a RoundTripBatch): no task or
        coroutine per request, with a ``gathering`` one wait for all of them, and with a
        ``group`` (of one signature, ``item`` its first, at most ``max_batch_size``) one
        ticket for many, joining one batch together. A caller that goes away calls
        :meth:`forget`.
        """
        if not self._accepting:
            raise ShuttingDown("the worker is draining; retry on another worker")
        rows = 1 if group is None else len(group)
        if rows > self.max_batch_size:  # no batch could ever take it: the queue would wedge
            raise ValueError(f"a group of {rows} is over max_batch_size {self.max_batch_size}")
        if self._queued + rows > self.max_queue_size:
            raise QueueFull(
                f"the worker's queue is full ({self.max_queue_size} requests waiting; "
                "max_queue_size); retry with backoff"
            )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ticket = Ticket(
            item, future, time.monotonic(), deadline, gathering, held, compute_bytes, None, group
        )
        queue = self._queues.setdefault(item.signature, collections.deque())
        queue.append(ticket)
        self._queued += rows
        self._arrival.set()
        return ticket

    def forget(self, ticket: Ticket) -> None:
        """The caller of an :meth:`enqueue` went away: cancel it and take it out of the queue."""
        ticket.future.cancel()
        end_request(ticket.span, "CANCELLED: its call ended before it was answered")
        self._forget(ticket.item.signature, ticket)

    def _forget(self, signature: ShapeSignature, ticket: Ticket) -> None:
        """Take a request whose caller went away (cancelled, deadline passed) out of the
        queue at once, so it stops counting against ``max_queue_size`` and its bytes can be
        freed; a request already taken into a batch is simply not answered."""
        queue = self._queues.get(signature)
        if queue is None:
            return
        try:
            queue.remove(ticket)
        except ValueError:
            return  # already in a batch
        self._queued -= ticket.rows
        if not queue:
            del self._queues[signature]

    async def drain(self) -> None:
        """Stop taking requests, answer every queued one, then stop the runner."""
        self._accepting = False
        self._arrival.set()
        if self._runner is not None:
            await self._runner
            self._runner = None
        if self._running:
            await asyncio.gather(*self._running)

    async def _run(self) -> None:
        while True:
            if not self._queued:
                self._moved = time.monotonic()
                if not self._accepting:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            lane = await self._idle.get()  # a lane is free: form its batch now
            await self._start_batch(lane)

    async def _start_batch(self, lane: Lane[EngineT]) -> None:
        """Form ``lane``'s next batch and start it, or give the lane back. A frame of its own:
        its tickets (their inputs) are let go of once it started, not at the next batch."""
        batch: list[Ticket] = []
        signature = await self._next_signature(lane) if self._queued else None
        if signature is not None:
            batch = self._take(signature)
            if self.on_taken is not None:
                self.on_taken()
        if batch and signature is not None:
            computing, batch = await self._reserve(signature, batch)
        if not batch or signature is None:
            self._idle.put_nowait(lane)
            if signature is None and self._queued:  # every queued shape is compiling
                self._arrival.clear()
                await self._arrival.wait()
            return
        task = asyncio.create_task(self._execute(lane, signature, batch, computing))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _next_signature(self, lane: Lane[EngineT]) -> ShapeSignature | None:
        """The signature of the oldest request that ``lane`` can run now, once its batch is
        full or its window is over; None when every queued signature is being compiled for
        it. A signature the lane has never run is handed to the compile thread first."""
        while True:
            ready: Iterable[ShapeSignature] = self._queues
            if self._compiling:
                ready = [sig for sig in ready if (lane.name, sig) not in self._compiling]
                if not ready:
                    return None
            signature = min(ready, key=lambda sig: self._queues[sig][0].arrived)
            if self.compiler is None or self._warm.knows(lane, signature):
                break
            self._start_compiling(lane, signature)
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
        if signature not in self._queues:  # every request of it left while the window was open
            return None
        return signature

    def _start_compiling(self, lane: Lane[EngineT], signature: ShapeSignature) -> None:
        """Compile ``signature`` for ``lane`` on the compile thread; its requests stay queued
        (other signatures' batches run meanwhile) and are taken once it is done."""
        key = (lane.name, signature)
        self._compiling.add(key)
        bucket = lane.engine.bucket_for(min(len(self._queues[signature]), self.max_batch_size))
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.compiler, lane.engine.prepare, signature, bucket)

        async def compiled() -> None:
            try:
                await work
            except Exception as error:  # the lane will try again and fail its requests
                log.warning(
                    "compile failed", extra={"signature": str(signature), "error": repr(error)}
                )
            finally:
                self._compiling.discard(key)
                self._warm.remember(key)
                self._moved = time.monotonic()
                self._arrival.set()

        task = asyncio.create_task(compiled())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _reserve(
        self, signature: ShapeSignature, batch: list[Ticket]
    ) -> tuple[Reservation | None, list[Ticket]]:
        """Reserve the compute bytes of the longest head of ``batch`` the budget can take
        now (the rest go back to the front of the queue), waiting for bytes to come back
        when not even one request fits. Requests whose caller left or whose deadline passed
        meanwhile are dropped."""
        budget = self._budget
        if budget is None:
            return None, batch
        while True:
            room = budget.limit - budget.in_use
            count = 0
            need = 0
            for ticket in batch:
                if need + ticket.compute_bytes > room:
                    break
                need += ticket.compute_bytes
                count += 1
            taken = batch[:count]
            waiting = [ticket.held for ticket in taken if ticket.held is not None]
            computing = budget.try_compute(need, waiting) if count else None
            if computing is not None:
                self._put_back(signature, batch[count:])
                return computing, taken
            # nothing but bytes coming back lets it run: answers taken, calls closed,
            # refusals, cancels, a running batch finishing (each sets ``freed``)
            self._held_back = len(batch)
            try:
                await budget.wait_for_room()
            finally:
                self._held_back = 0
            batch = live(batch)
            if not batch:
                return None, []

    def _put_back(self, signature: ShapeSignature, rest: list[Ticket]) -> None:
        """Requests taken for a batch that did not fit: back to the front, in order."""
        if rest:
            queue = self._queues.setdefault(signature, collections.deque())
            queue.extendleft(reversed(rest))
            self._queued += sum(ticket.rows for ticket in rest)

    def _take(self, signature: ShapeSignature) -> list[Ticket]:
        """Pop up to ``max_batch_size`` live requests of ``signature``, in order (a group
        whole, or not yet); fail expired ones."""
        queue = self._queues.get(signature)
        if queue is None:  # every request of it was forgotten while the window was open
            return []
        batch: list[Ticket] = []
        rows = 0
        now = time.monotonic()
        while queue and rows + queue[0].rows <= self.max_batch_size:
            ticket = queue.popleft()
            self._queued -= ticket.rows
            if ticket.future.done():
                continue  # cancelled: the caller went away
            if ticket.deadline is not None and ticket.deadline <= now:
                ticket.fail(DeadlineExpired("the deadline passed while the request was queued"))
                continue
            batch.append(ticket)
            rows += ticket.rows
        if not queue:
            del self._queues[signature]
        return batch

    async def _execute(
        self,
        lane: Lane[EngineT],
        signature: ShapeSignature,
        batch: list[Ticket],
        computing: Reservation | None = None,
    ) -> None:
        """Hand ``batch`` to the lane's thread, then resolve each request with its outcome
        and give the batch's compute bytes back (each answer holds its own from then on)."""
        items = [item for ticket in batch for item in ticket.inputs()]
        loop = asyncio.get_running_loop()
        self._moved = time.monotonic()
        traced = [t for t in batch if t.span is not None] if self.tracing is not None else []
        try:
            started, wall_started = time.monotonic(), time.time_ns()
            outcomes, counts = await loop.run_in_executor(
                lane.executor, run_batch, lane.engine, items, bool(traced)
            )
            finished = time.monotonic()
        finally:
            self._moved = time.monotonic()
            self._idle.put_nowait(lane)
            self._arrival.set()  # the runner may be waiting for a lane, not for requests
            if computing is not None:
                computing.release()
        waits = [started - t.arrived for t in batch for _ in range(t.rows)]
        record = BatchRecord(signature, len(items), waits, finished - started, lane.name)
        if traced and self.tracing is not None:
            spans = [t.span if row == 0 else None for t in batch for row in range(t.rows)]
            self.tracing.record_batch(record, spans, started_ns=wall_started, counts=counts)
        settle_batch(batch, outcomes)
        if self._on_batch is not None:
            self._on_batch(record)
