"""The protocol-neutral pipeline under every door: a call admitted by bytes, its requests
queued into the shared per-shape batches, answered, and what it held given back however
it ends.

The doors (``doors/``: RoundTrip and RoundTripBatch, RoundTripStream, V2 over gRPC, V2
over REST) only turn their wire format into pipeline inputs and the pipeline's outcomes
back into their wire format. What they share is here:

* :class:`Pipeline`: the worker's byte budget, batcher, limits, audit, counters, open
  calls (:class:`OpenCalls`, what a drain refuses and waits on) and numerics fingerprint;
* :class:`Envelope`: the one envelope every call (and every stream message) is answered
  in: open for the drain while it runs, counted once by the code it really ended with,
  and its failure mapped by :func:`~roundtrip.server.errors.failure_of`;
* :class:`Call`: one call's claim on the worker. It holds every reservation the call takes
  (its message's bytes, each request's working set, then each answer's bytes) and every
  request it queued, and :meth:`Call.close` gives all of it back, once, whichever way the
  call ended: answered, failed, cancelled, past its deadline, drained, its caller gone,
  its stream unread. A door closes its calls by construction (``with``, a done-callback,
  or the stream that owns them); no door releases a reservation itself.

>>> pipeline = Pipeline(batcher=None, budget=ByteBudget(100), limits=None, auditor=None,
...                     metrics=None, max_batch_items=1)
>>> with pipeline.call(deadline=None, message=pipeline.received(10)) as call:
...     with call.holding(60):  # decoding a body, say
...         print(pipeline.budget.in_use)
70
>>> pipeline.budget.in_use  # the call closed: everything it held is back
0
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import grpc

from roundtrip.server import numerics
from roundtrip.server.admission import (
    ByteBudget,
    Reservation,
    WorkingSet,
    answer_bytes,
    working_set_bytes,
)
from roundtrip.server.audit import Auditor
from roundtrip.server.batcher import Batcher, Gathering, Ticket
from roundtrip.server.errors import Failure, RequestError, ShuttingDown, failure_of
from roundtrip.server.metrics import WorkerMetrics
from roundtrip.server.validation import RequestLimits
from roundtrip.server.values import RoundTripAnswer, RoundTripInput


class OpenCalls:
    """The calls handlers hold now, and whether new ones are accepted: what a drain waits on.

    Unary calls and whole streams count one each. Once :meth:`refuse_new` runs,
    new calls are answered UNAVAILABLE (retryable elsewhere) and every open
    stream is asked to finish what it started and end.

    >>> calls = OpenCalls()
    >>> calls.enter(); calls.open, calls.accepting
    (1, True)
    >>> calls.refuse_new(); calls.leave(); calls.open, calls.accepting
    (0, False)
    """

    def __init__(self) -> None:
        self.open = 0
        self.accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._streams: set[Callable[[], None]] = set()

    def enter(self) -> None:
        self.open += 1
        self._idle.clear()

    def leave(self) -> None:
        self.open -= 1
        if not self.open:
            self._idle.set()

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ShuttingDown("the worker is draining; retry on another worker")

    def watch_stream(self, end: Callable[[], None]) -> Callable[[], None]:
        """Register an open stream's ``end``, run on :meth:`refuse_new`; returns the unregister."""
        self._streams.add(end)
        return functools.partial(self._streams.discard, end)

    def refuse_new(self) -> None:
        self.accepting = False
        for end in list(self._streams):
            end()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is open (True), or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Pipeline:
    """What every door admits its calls into, and answers them from."""

    def __init__(
        self,
        *,
        batcher: Batcher,
        budget: ByteBudget,
        limits: RequestLimits,
        auditor: Auditor,
        metrics: WorkerMetrics,
        max_batch_items: int,
    ) -> None:
        self.batcher = batcher
        self.budget = budget
        self.limits = limits
        self.auditor = auditor
        self.metrics = metrics
        self.max_batch_items = max_batch_items
        self.calls = OpenCalls()
        #: The numerics fingerprint, set once the self-check has run (empty before).
        self.fingerprint = ""

    def check_new_call(self, expected_fingerprint: str | None) -> None:
        """What every call asking for work passes first, whichever its door: the worker still
        takes new calls, and it has the numerics fingerprint the call insists on (if any)."""
        self.calls.check_accepting()
        numerics.check_fingerprint(expected_fingerprint, self.fingerprint)

    def received(self, nbytes: int) -> Reservation:
        """Count a message that has arrived (it is in memory, refused or not); the
        :class:`Call` it is handed to owns the reservation from then on."""
        return self.budget.received(nbytes)

    def call(self, *, deadline: float | None, message: Reservation | None = None) -> Call:
        """A new call whose requests must be answered by ``deadline`` (``time.monotonic()``;
        None: none), holding its ``message``'s bytes from now on."""
        return Call(self, deadline, message)

    def envelope(
        self,
        method: str,
        *,
        dropped: Callable[[], grpc.StatusCode],
        counts: bool = True,
        opens: bool = True,
    ) -> Envelope:
        """The envelope a call of ``method`` is answered in (:class:`Envelope`)."""
        return Envelope(self, method, dropped=dropped, counts=counts, opens=opens)


class Envelope:
    """One call (or one stream message) answered: open for the drain while it runs
    (``opens``), counted once by the code it really ended with, its failure mapped by
    :func:`~roundtrip.server.errors.failure_of` and kept in :attr:`failure` (the exception
    is swallowed: the door answers with the failure in its own wire format).

    A cancel (the caller went away, or its deadline passed) is counted as ``dropped()``
    says and propagates. ``counts=False`` is for a call whose requests are counted one by
    one (a batch, a stream): only a failure of the call as a whole is counted.
    """

    __slots__ = ("_counts", "_dropped", "_method", "_opens", "_pipeline", "_started", "failure")

    def __init__(
        self,
        pipeline: Pipeline,
        method: str,
        *,
        dropped: Callable[[], grpc.StatusCode],
        counts: bool,
        opens: bool,
    ) -> None:
        self._pipeline = pipeline
        self._method = method
        self._dropped = dropped
        self._counts = counts
        self._opens = opens
        self._started = 0.0
        self.failure: Failure | None = None

    def __enter__(self) -> Envelope:
        self._started = time.perf_counter()
        if self._opens:
            self._pipeline.calls.enter()
        if self._counts:
            self._pipeline.metrics.inflight.inc()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        metrics = self._pipeline.metrics
        if self._counts:
            metrics.inflight.dec()
        if self._opens:
            self._pipeline.calls.leave()
        seconds = time.perf_counter() - self._started
        if error is None:
            if self._counts:
                metrics.observe_rpc(self._method, "OK", seconds)
            return False
        if isinstance(error, asyncio.CancelledError):
            if self._counts:  # a call that counts its requests has counted them as dropped
                metrics.observe_rpc(self._method, self._dropped().name, seconds)
            return False
        if not isinstance(error, Exception):
            return False
        self.failure = failure_of(error)
        metrics.observe_rpc(self._method, self.failure.code.name, seconds)
        return True


class Call:
    """One call's claim on the worker: every reservation it takes and every request it
    queued, given back by :meth:`close` (once, however often called).

    A request is admitted (:meth:`admit`) by reserving its computation's working set before
    it is decoded, then queued into the shared per-shape batches. Once answered it holds
    only its answer's bytes, until the door has written the answer and closes the call; a
    request that failed holds nothing; the message's bytes are given back once the call's
    requests are answered. A stream message's call also holds its place among the stream's
    unanswered messages. Closing a call whose requests are still queued takes them out of the
    queue (its caller went away).
    """

    __slots__ = (
        "_closed",
        "_gathering",
        "_held",
        "_message",
        "_pipeline",
        "_place",
        "_queued",
        "deadline",
    )

    def __init__(
        self, pipeline: Pipeline, deadline: float | None, message: Reservation | None
    ) -> None:
        self._pipeline = pipeline
        self.deadline = deadline
        self._message = message
        self._held: list[Reservation] = []
        self._queued: list[tuple[RoundTripInput, Reservation, Ticket]] = []
        self._gathering: Gathering | None = None
        self._place: asyncio.Semaphore | None = None
        self._closed = False

    def __enter__(self) -> Call:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def message_bytes(self) -> int:
        """The size of the message the call's requests came in (0 when not counted)."""
        return self._message.nbytes if self._message is not None else 0

    @property
    def held_bytes(self) -> int:
        """Bytes the call holds now: its message (until answered) and its requests'."""
        held = self.message_bytes
        for reservation in self._held:
            held += reservation.nbytes
        return held

    def occupy(self, place: asyncio.Semaphore) -> None:
        """Hold a place the call has taken (one of a stream's ``max_stream_inflight``), given
        back when the call closes."""
        self._place = place

    def hold_message(self, message: Reservation) -> None:
        """Hold the bytes of the call's message, read after the call began (a REST body)."""
        if self._message is not None:
            self._message.release()
        self._message = message

    @contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` more while the block runs (decoding a body, say), or raise the
        budget's refusal before it runs."""
        reservation = self._pipeline.budget.reserve(nbytes)
        try:
            yield
        finally:
            reservation.release()

    def admit(self, size: WorkingSet, decode: Callable[[], RoundTripInput]) -> None:
        """Reserve the working set of a request weighed at ``size``, decode it (``decode``
        reads its payload, after the reservation), and queue it with the call's others,
        answered together by :meth:`answers`. A refusal raises its :class:`RequestError`
        and leaves nothing held."""
        pipeline = self._pipeline
        held = pipeline.budget.reserve(working_set_bytes(size))
        try:
            item = decode()
            if self._gathering is None:
                self._gathering = Gathering()
            ticket = pipeline.batcher.enqueue(
                item, deadline=self.deadline, gathering=self._gathering
            )
        except BaseException:
            held.release()
            raise
        self._held.append(held)
        self._queued.append((item, held, ticket))

    async def answer(
        self, size: WorkingSet, decode: Callable[[], RoundTripInput]
    ) -> RoundTripAnswer:
        """The call's one request, admitted as :meth:`admit` admits one, waited for and
        settled: its answer, or its own error raised."""
        pipeline = self._pipeline
        held = pipeline.budget.reserve(working_set_bytes(size))
        self._held.append(held)  # the call's from here: given back when it closes
        item = decode()
        ticket = pipeline.batcher.enqueue(item, deadline=self.deadline)
        self._queued.append((item, held, ticket))
        try:
            answer = await ticket.future
        except RequestError:
            self._answered(held, None)
            raise
        pipeline.auditor.offer(item, answer)
        self._answered(held, answer)
        return answer

    def _answered(self, held: Reservation, answer: RoundTripAnswer | None) -> None:
        """A request is done with: it holds its answer's bytes from now on (none if it
        failed), and the call's message is no longer needed."""
        if self._message is not None:
            self._message.release()
        if answer is None:
            held.release()
        else:
            held.shrink(answer_bytes(answer.orig_out.nbytes if answer.orig_out is not None else 0))

    async def answers(self) -> list[RoundTripAnswer | Exception]:
        """Every queued request's answer, or its own error (a :class:`RequestError`; any
        other exception is a bug in the worker), in the order admitted."""
        if self._gathering is not None:
            await self._gathering.wait()
        return [self._settle(item, held, ticket) for item, held, ticket in self._queued]

    def _settle(
        self, item: RoundTripInput, held: Reservation, ticket: Ticket
    ) -> RoundTripAnswer | Exception:
        """An answered request offered to the audit, then :meth:`_answered`."""
        error = ticket.future.exception()
        if isinstance(error, Exception):
            self._answered(held, None)
            return error
        answer = ticket.future.result()
        self._pipeline.auditor.offer(item, answer)
        self._answered(held, answer)
        return answer

    def close(self) -> None:
        """Give back everything the call holds, and take its unanswered requests out of the
        queue."""
        if self._closed:
            return
        self._closed = True
        for _, _, ticket in self._queued:
            if not ticket.future.done() or ticket.future.cancelled():
                self._pipeline.batcher.forget(ticket)
        for held in self._held:
            held.release()
        if self._message is not None:
            self._message.release()
        if self._place is not None:
            self._place.release()
