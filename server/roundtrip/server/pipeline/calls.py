"""What one call holds: :class:`Call`, its claim on the worker.

A call holds every reservation it takes (its message's bytes; each request's decoded input
and answer from admission until the answer is taken; a batch holds its computation's
working set while it runs) and every request it queued, all charged to its caller
(:class:`~roundtrip.server.pipeline.admission.Caller`: a connection), and :meth:`Call.close` gives
all of it back, once, whichever way the call ended: answered, failed, cancelled, past its
deadline, drained, its caller gone, its stream unread. A door closes its calls by
construction (``with``, a done-callback, or the stream that owns them); no door releases a
reservation itself.

>>> from roundtrip.server.pipeline.admission import ByteBudget, Caller
>>> budget = ByteBudget(100)
>>> with Call(Holdings(budget, None, None, None), Caller("a"), None, budget.received(10)) as call:
...     with call.holding(60):  # decoding a body, say (the message: 2 x 10)
...         print(budget.in_use)
80
>>> budget.in_use  # the call closed: everything it held is back
0
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace

from roundtrip.server.engine.audit import Auditor
from roundtrip.server.errors import RequestError
from roundtrip.server.ops.tracing import Tracing, end_request, queued
from roundtrip.server.pipeline.admission import (
    ByteBudget,
    Caller,
    Reservation,
    WorkingSet,
    reserved_bytes,
)
from roundtrip.server.pipeline.tickets import Queue, Ticket
from roundtrip.server.pipeline.turns import QueueTurns
from roundtrip.server.values import RoundTripAnswer, RoundTripInput


@dataclass(frozen=True, slots=True)
class Holdings:
    """What a call takes its claims from: the byte budget, the queue (the batcher), the turns
    of calls of many, the audit its answers are offered to, and the tracing its requests'
    spans start in (None: off)."""

    budget: ByteBudget
    batcher: Queue | None
    auditor: Auditor | None
    turns: QueueTurns | None
    tracing: Tracing | None = None


class Closing(Protocol):
    """What closes with a call (its requests, if it is a call of many)."""

    def close(self) -> None:
        """The call closed."""
        ...


class Call:
    """One call's claim on the worker: every reservation it takes and every request it
    queued, given back by :meth:`close` (once, however often called).

    A request is admitted by reserving what it holds outside a computation (its decoded
    input and its answer) and keeping room for its computation's working set, before it is
    decoded, then queued into the shared per-shape batches. A call of many requests admits
    them in groups, queued as the :class:`QueueTurns` allow
    (:class:`~roundtrip.server.pipeline.many.Many`, :meth:`attach`); the others wait in the
    call, holding nothing but their place in it, and are admitted in order as places come
    back. The message's bytes are given back once the call's requests are decoded. A stream
    message's call also holds its place among the stream's unanswered messages. Closing a
    call whose requests are still queued takes them out of the queue (its caller went away,
    or it failed whole).
    """

    __slots__ = (
        "_answers",
        "_closed",
        "_held",
        "_holdings",
        "_many",
        "_message",
        "_message_size",
        "_on_close",
        "_place",
        "_queued",
        "_trace",
        "caller",
        "deadline",
    )

    def __init__(
        self,
        holdings: Holdings,
        caller: Caller,
        deadline: float | None,
        message: Reservation | None,
        on_close: Callable[[Caller], None] | None = None,
        message_size: int = 0,
    ) -> None:
        self._holdings = holdings
        self.caller = caller
        caller.calls += 1
        self.deadline = deadline
        self._message = message
        self._message_size = message_size
        self._on_close = on_close
        self._held: list[Reservation] = []
        self._answers = 0
        self._queued: list[Ticket] = []
        #: Its requests, if it is a call of many.
        self._many: Closing | None = None
        self._place: asyncio.Semaphore | None = None
        self._closed = False
        #: The trace context its requests' spans start in (the call's span, taken when it
        #: admits its first request): None until then, or while tracing is off.
        self._trace: otel_context.Context | None = None

    def __enter__(self) -> Call:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def message_bytes(self) -> int:
        """The size on the wire of the message the call's requests came in (0: unknown)."""
        return self._message_size

    @property
    def answer_bytes(self) -> int:
        """What its requests' answers hold (reserved at admission): what gRPC still holds
        of the call once its handler has returned."""
        return self._answers

    def claim(self) -> None:
        """Charge the message the call came with to its caller, or raise Overloaded when
        that is over the caller's share of the budget."""
        if self._message is not None:
            self._holdings.budget.charge(self._message, self.caller)

    def occupy(self, place: asyncio.Semaphore) -> None:
        """Hold a place the call has taken (one of a stream's ``max_stream_inflight``), given
        back when the call closes."""
        self._place = place

    def hold_message(self, nbytes: int) -> None:
        """Hold ``nbytes`` more of the call's message as it arrives after the call began (a
        REST body), or raise the budget's refusal."""
        budget = self._holdings.budget
        if self._message is None:
            self._message = budget.reserve(nbytes, self.caller)
        else:
            budget.grow(self._message, nbytes)

    def reserve(self, nbytes: int) -> None:
        """Hold ``nbytes`` more until the call closes (a door's copies of the answer), or
        raise the budget's refusal."""
        self._held.append(self._holdings.budget.reserve(nbytes, self.caller))
        self._answers += nbytes

    @contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` more while the block runs (decoding a body, say), or raise the
        budget's refusal before it runs."""
        reservation = self._holdings.budget.reserve(nbytes, self.caller)
        try:
            yield
        finally:
            reservation.release()

    def _queue(
        self, size: WorkingSet, decode: Callable[[], RoundTripInput]
    ) -> tuple[RoundTripInput, Reservation, Ticket]:
        """The call's one request: reserve ``size``'s holdings and keep room for its
        computation, decode, and queue; a refusal raises its :class:`RequestError` and
        holds nothing."""
        holdings = self._holdings
        held_bytes, compute, answer = reserved_bytes(size)
        span = None if holdings.tracing is None else self.request_span(held_bytes, compute)
        held = None
        try:
            held = holdings.budget.admit(held_bytes, compute, self.caller)
            self._answers += answer
            item = decode()
            assert holdings.batcher is not None
            ticket = holdings.batcher.enqueue(
                item,
                deadline=self.deadline,
                held=held,
                compute_bytes=compute,
            )
        except BaseException as error:
            if held is not None:
                held.release()
            if span is not None:
                end_request(span, getattr(error, "message", repr(error)))
            raise
        if span is not None:
            ticket.span = queued(span, item)
        self._held.append(held)
        self._queued.append(ticket)
        return item, held, ticket

    def request_span(self, held_bytes: int, compute_bytes: int) -> Any:
        """A request's span under the call's (None: tracing is off)."""
        tracing = self._holdings.tracing
        if tracing is None:
            return None
        if self._trace is None:  # the call's span: the first request is queued in its task
            self._trace = otel_context.get_current()
        attributes = {"roundtrip.held_bytes": held_bytes, "roundtrip.compute_bytes": compute_bytes}
        return tracing.start_request(self._trace, attributes)

    def requests_traced(self) -> bool:
        """Take the call's trace context for its requests' spans (now: the call's task runs
        this); whether the call is recorded (each request then gets a span of its own)."""
        if self._holdings.tracing is None:
            return False
        self._trace = otel_context.get_current()
        return bool(trace.get_current_span(self._trace).is_recording())

    def attach(self, many: Closing) -> None:
        """The call is a call of many: ``many`` holds its requests
        (:class:`~roundtrip.server.pipeline.many.Many`), closed with it."""
        self._many = many

    def decoded(self) -> None:
        """Every request of the call is decoded, or never will be: the message is no longer
        needed."""
        if self._message is not None:
            self._message.release()

    def keep(self, held: Reservation, tickets: Sequence[Ticket], answer_bytes: int) -> None:
        """Queued requests of the call of many: what they hold (their answers'
        ``answer_bytes`` among it) and their tickets, given back when the call closes."""
        self._held.append(held)
        self._queued += tickets
        self._answers += answer_bytes

    async def answer(
        self, size: WorkingSet, decode: Callable[[], RoundTripInput]
    ) -> RoundTripAnswer:
        """The call's one request, admitted, waited for and settled: its answer, or its own
        error raised."""
        item, held, ticket = self._queue(size, decode)
        try:
            answer: RoundTripAnswer = await ticket.future
        except RequestError:
            self._done_with(held, None)
            raise
        self.offer(item, answer)
        self._done_with(held, answer)
        return answer

    def offer(self, item: RoundTripInput, answer: RoundTripAnswer) -> None:
        """An answer of the call, offered to the audit."""
        auditor = self._holdings.auditor
        if auditor is not None:
            auditor.offer(item, answer)

    def _done_with(self, held: Reservation, answer: RoundTripAnswer | None) -> None:
        """A request is done with: it keeps holding its input and its answer's bytes until
        the answer is taken (a failed one holds nothing from now), and the call's message is
        no longer needed."""
        if self._message is not None:
            self._message.release()
        if answer is None:
            held.release()

    def close(self) -> None:
        """Give back everything the call holds, and take its unanswered requests out of the
        queue."""
        if self._closed:
            return
        self._closed = True
        holdings = self._holdings
        many = self._many
        if many is not None:
            many.close()
        forgotten = 0
        for ticket in self._queued:
            if not ticket.future.done():
                forgotten += ticket.rows
                assert holdings.batcher is not None
                holdings.batcher.forget(ticket)
        if many is None:
            forgotten = 0  # a call of one request: not counted among outstanding ones
        for held in self._held:
            held.release()
        if self._message is not None:
            self._message.release()
        if self._place is not None:
            self._place.release()
        self.caller.calls -= 1
        if forgotten:
            self.caller.outstanding -= forgotten
        if self._on_close is not None:
            self._on_close(self.caller)
        if forgotten and holdings.turns is not None:
            holdings.turns.grant()
        # A call and its tickets refer to each other (a ticket counts down the call's
        # outstanding requests): let go of them, so that reference counting frees the whole
        # call now rather than a collector pass later (tests/test_pipeline.py).
        self._queued = []
        self._held = []
        self._many = None
