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
  (its message's bytes, each request's decoded input while it waits, then each answer's
  bytes; a batch holds its computation's working set while it runs) and every
  request it queued, and :meth:`Call.close` gives all of it back, once, whichever way the
  call ended: answered, failed, cancelled, past its deadline, drained, its caller gone,
  its stream unread. A door closes its calls by construction (``with``, a done-callback,
  or the stream that owns them); no door releases a reservation itself.

>>> from roundtrip.server.validation import RequestLimits
>>> limits = RequestLimits(max_x_elements=8, max_features=8, max_param_bytes=1024,
...                        max_output_elements=64)
>>> pipeline = Pipeline(batcher=None, budget=ByteBudget(100), limits=limits, auditor=None,
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
import collections
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
    compute_bytes,
    waiting_bytes,
)
from roundtrip.server.audit import Auditor
from roundtrip.server.batcher import Batcher, Gathering, Ticket
from roundtrip.server.errors import Failure, LimitExceeded, RequestError, ShuttingDown, failure_of
from roundtrip.server.metrics import WorkerMetrics
from roundtrip.server.validation import MAX_RANK, RequestLimits
from roundtrip.server.values import RoundTripAnswer, RoundTripInput
from roundtrip.server.wire_counts import RepeatedLimits


def repeated_limits(limits: RequestLimits, max_batch_items: int) -> RepeatedLimits:
    """The repeated fields of every door's messages and the knobs that bound them: a batch's
    requests and V2's seed and features elements by ``max_batch_items``, shapes by
    ``max_x_rank`` (V2's by its own rank limit, checked after the parse with its message)."""
    items = (max_batch_items, "max_batch_items, env ROUNDTRIP_MAX_BATCH_ITEMS")
    rank = (limits.max_x_rank, "max_x_rank, env ROUNDTRIP_MAX_X_RANK")
    contents = "inference.InferTensorContents."
    return RepeatedLimits(
        {
            "roundtrip.v1.RoundTripBatchRequest.requests": items,
            "roundtrip.v1.Array.shape": rank,
            "inference.ModelInferRequest.InferInputTensor.shape": (MAX_RANK, "numpy's rank limit"),
            **{contents + kind: items for kind in ("int64_contents", "int_contents")},
        }
    )


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
        max_answer_bytes: int = 1 << 62,
        queue_share: float = 1.0,
    ) -> None:
        self.batcher = batcher
        self.budget = budget
        self.limits = limits
        self.auditor = auditor
        self.metrics = metrics
        self.max_batch_items = max_batch_items
        self.max_answer_bytes = max_answer_bytes
        #: What a message's repeated fields may hold, checked on the wire before parsing.
        self.repeated_limits = repeated_limits(limits, max_batch_items)
        #: Most requests one call of many may hold queued at once (``max_queue_share``).
        self.queue_share = max(1, int(batcher.max_queue_size * queue_share)) if batcher else 1
        self.calls = OpenCalls()
        #: The numerics fingerprint, set once the self-check has run (empty before).
        self.fingerprint = ""

    def check_new_call(self, expected_fingerprint: str | None) -> None:
        """What every call asking for work passes first, whichever its door: the worker still
        takes new calls, and it has the numerics fingerprint the call insists on (if any)."""
        self.calls.check_accepting()
        numerics.check_fingerprint(expected_fingerprint, self.fingerprint)

    def check_answer_size(self, nbytes: int) -> None:
        """Refuse, before any compute, a call whose answer would be ``nbytes``: over
        ``max_message_bytes`` it could never be sent (gRPC refuses to send it, and a REST
        answer is held to the same limit)."""
        if nbytes > self.max_answer_bytes:
            raise LimitExceeded(
                f"the answer would be {nbytes} bytes, over this worker's limit of "
                f"{self.max_answer_bytes} (max_message_bytes, env ROUNDTRIP_MAX_MESSAGE_BYTES): "
                "ask for fewer rows, fewer features, or no outputs (return_outputs, orig_out, "
                "merged_out)"
            )

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


class _Request:
    """One request of a call of many, in the order the door admitted it: waiting in the call
    for its turn, queued (its item, reservation and ticket), or refused when its turn came."""

    __slots__ = ("decode", "error", "held", "item", "size", "ticket")

    def __init__(self, size: WorkingSet, decode: Callable[[], RoundTripInput]) -> None:
        self.size = size
        self.decode = decode
        self.item: RoundTripInput | None = None
        self.held: Reservation | None = None
        self.ticket: Ticket | None = None
        self.error: Exception | None = None


class _Turns(Gathering):
    """A call's queued requests, counted down as the batcher answers them; each answer lets
    the call queue its next waiting request (a call holds at most its share of the queue)."""

    __slots__ = ("_call",)

    def __init__(self, call: Call) -> None:
        super().__init__()
        self._call = call

    def answered(self) -> None:
        self._call._next_turn()  # queued before the count can reach 0
        super().answered()


class Call:
    """One call's claim on the worker: every reservation it takes and every request it
    queued, given back by :meth:`close` (once, however often called).

    A request is admitted by reserving its computation's working set before it is decoded,
    then queued into the shared per-shape batches. A call of many requests (:meth:`admit`,
    :meth:`answers`) holds at most ``Pipeline.queue_share`` of them queued at once; the
    others wait in the call, holding nothing but their place in it, and are admitted in
    order as earlier ones are answered, so one batch caller cannot fill the queue for
    everyone. Once answered a request holds only its answer's bytes, until the door has
    written the answer and closes the call; a request that failed holds nothing; the
    message's bytes are given back once the call's requests are answered. A stream
    message's call also holds its place among the stream's unanswered messages. Closing a
    call whose requests are still queued takes them out of the queue (its caller went away).
    """

    __slots__ = (
        "_closed",
        "_held",
        "_message",
        "_pipeline",
        "_place",
        "_queued",
        "_requests",
        "_turns",
        "_waiting",
        "deadline",
    )

    def __init__(
        self, pipeline: Pipeline, deadline: float | None, message: Reservation | None
    ) -> None:
        self._pipeline = pipeline
        self.deadline = deadline
        self._message = message
        self._held: list[Reservation] = []
        self._queued: list[Ticket] = []
        self._requests: list[_Request] = []
        self._waiting: collections.deque[_Request] = collections.deque()
        self._turns: _Turns | None = None
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

    def hold_message(self, nbytes: int) -> None:
        """Hold ``nbytes`` more of the call's message as it arrives after the call began (a
        REST body), or raise the budget's refusal."""
        budget = self._pipeline.budget
        if self._message is None:
            self._message = budget.reserve(nbytes)
        else:
            budget.grow(self._message, nbytes)

    @contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` more while the block runs (decoding a body, say), or raise the
        budget's refusal before it runs."""
        reservation = self._pipeline.budget.reserve(nbytes)
        try:
            yield
        finally:
            reservation.release()

    def _queue(
        self, size: WorkingSet, decode: Callable[[], RoundTripInput]
    ) -> tuple[RoundTripInput, Reservation, Ticket]:
        """Reserve ``size``'s working set, decode, and queue (with the call's turns, if it
        has any); a refusal raises its :class:`RequestError` and holds nothing."""
        pipeline = self._pipeline
        compute = compute_bytes(size)
        held = pipeline.budget.admit(waiting_bytes(size), compute)
        try:
            item = decode()
            ticket = pipeline.batcher.enqueue(
                item,
                deadline=self.deadline,
                gathering=self._turns,
                held=held,
                compute_bytes=compute,
            )
        except BaseException:
            held.release()
            raise
        self._held.append(held)
        self._queued.append(ticket)
        return item, held, ticket

    def admit(self, size: WorkingSet, decode: Callable[[], RoundTripInput]) -> None:
        """Admit one request of a call of many, weighed at ``size`` (``decode`` reads its
        payload, once it is admitted): queued now if the call's share of the queue allows,
        else when an earlier one is answered. A refusal now raises its
        :class:`RequestError`; one when its turn comes is its outcome in :meth:`answers`."""
        if self._turns is None:
            self._turns = _Turns(self)
        request = _Request(size, decode)
        if self._waiting or self._turns.pending >= self._pipeline.queue_share:
            self._waiting.append(request)
        else:
            request.item, request.held, request.ticket = self._queue(size, decode)
        self._requests.append(request)

    def _next_turn(self) -> None:
        """An earlier request was answered: queue the next waiting one (a refusal is that
        request's outcome, and the one after it gets the turn)."""
        while self._waiting and not self._closed:
            request = self._waiting.popleft()
            try:
                request.item, request.held, request.ticket = self._queue(
                    request.size, request.decode
                )
                return
            except Exception as error:
                request.error = error

    async def answers(self) -> list[RoundTripAnswer | Exception]:
        """Every admitted request's answer, or its own error (a :class:`RequestError`; any
        other exception is a bug in the worker), in the order admitted."""
        if self._turns is not None:
            await self._turns.wait()
        outcomes: list[RoundTripAnswer | Exception] = []
        for request in self._requests:
            if request.ticket is None or request.item is None or request.held is None:
                outcomes.append(request.error or RuntimeError("a request never got its turn"))
            else:
                outcomes.append(self._settle(request.item, request.held, request.ticket))
        return outcomes

    async def answer(
        self, size: WorkingSet, decode: Callable[[], RoundTripInput]
    ) -> RoundTripAnswer:
        """The call's one request, admitted, waited for and settled: its answer, or its own
        error raised."""
        item, held, ticket = self._queue(size, decode)
        try:
            answer = await ticket.future
        except RequestError:
            self._answered(held, None)
            raise
        self._pipeline.auditor.offer(item, answer)
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
            held.resize(answer_bytes(answer.orig_out.nbytes if answer.orig_out is not None else 0))

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
        self._waiting.clear()
        for ticket in self._queued:
            if not ticket.future.done() or ticket.future.cancelled():
                self._pipeline.batcher.forget(ticket)
        for held in self._held:
            held.release()
        if self._message is not None:
            self._message.release()
        if self._place is not None:
            self._place.release()
        # A call and its tickets refer to each other (a ticket counts down the call's
        # turns): let go of them, so that reference counting frees the whole call now
        # rather than a collector pass later (tests/test_pipeline.py).
        self._queued = []
        self._held = []
        self._requests = []
        self._turns = None
