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
import collections
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context

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
from roundtrip.server.pipeline.tickets import Outstanding, Queue, Ticket
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


class Call:
    """One call's claim on the worker: every reservation it takes and every request it
    queued, given back by :meth:`close` (once, however often called).

    A request is admitted by reserving what it holds outside a computation (its decoded
    input and its answer) and keeping room for its computation's working set, before it is
    decoded, then queued into the shared per-shape batches. A call of many requests
    (:meth:`admit`, :meth:`answers`) queues them as the :class:`QueueTurns` allow; the
    others wait in the call, holding nothing but their place in it, and are admitted in
    order as places come back. A request that failed holds nothing; the message's bytes are
    given back once the call's requests are answered. A stream message's call also holds
    its place among the stream's unanswered messages. Closing a call whose requests are
    still queued takes them out of the queue (its caller went away, or it failed whole).
    """

    __slots__ = (
        "_answers",
        "_closed",
        "_held",
        "_holdings",
        "_message",
        "_message_size",
        "_on_close",
        "_outstanding",
        "_place",
        "_queued",
        "_requests",
        "_trace",
        "_waiting",
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
        self._requests: list[_Request] = []
        self._waiting: collections.deque[_Request] = collections.deque()
        self._outstanding: Outstanding | None = None
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
        """Reserve ``size``'s holdings and keep room for its computation, decode, and queue
        (counted among the call's outstanding requests, if it has many); a refusal raises
        its :class:`RequestError` and holds nothing."""
        holdings = self._holdings
        held_bytes, compute, answer = reserved_bytes(size)
        span = None if holdings.tracing is None else self._request_span(held_bytes, compute)
        held = None
        try:
            held = holdings.budget.admit(held_bytes, compute, self.caller)
            self._answers += answer
            item = decode()
            assert holdings.batcher is not None
            ticket = holdings.batcher.enqueue(
                item,
                deadline=self.deadline,
                gathering=self._outstanding,
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

    def _request_span(self, held_bytes: int, compute_bytes: int) -> Any:
        """A request's span under the call's (None: tracing is off)."""
        tracing = self._holdings.tracing
        if tracing is None:
            return None
        if self._trace is None:  # the call's span: the first request is queued in its task
            self._trace = otel_context.get_current()
        attributes = {"roundtrip.held_bytes": held_bytes, "roundtrip.compute_bytes": compute_bytes}
        return tracing.start_request(self._trace, attributes)

    def admit(
        self,
        size: WorkingSet,
        decode: Callable[[], RoundTripInput],
        *,
        all_or_nothing: bool = False,
    ) -> None:
        """Admit one request of a call of many, weighed at ``size`` (``decode`` reads its
        payload, once it is admitted): queued now if the turns allow, else when its turn
        comes. A refusal now raises its :class:`RequestError`; one when its turn comes is its
        outcome in :meth:`answers`. ``all_or_nothing``: the call fails whole at its first
        failure (V2), so :meth:`answers` returns as soon as one fails."""
        if self._outstanding is None:
            self._outstanding = Outstanding(self._place_back, all_or_nothing)
            if self._holdings.tracing is not None:  # for the requests queued later
                self._trace = otel_context.get_current()
        request = _Request(size, decode)
        turns = self._holdings.turns
        if self._waiting:
            self._waiting.append(request)
        elif turns is not None and not turns.may_queue(self.caller):
            self._waiting.append(request)
            turns.wait(self)
        else:
            self._queue_request(request)
        self._requests.append(request)

    def _queue_request(self, request: _Request) -> None:
        request.item, request.held, request.ticket = self._queue(request.size, request.decode)
        self.caller.outstanding += 1

    def take_turn(self) -> bool:
        """Queue the next waiting request (its refusal is its outcome); whether more wait."""
        request = self._waiting.popleft()
        try:
            self._queue_request(request)
        except Exception as error:
            request.error = error
            if self._outstanding is not None:
                self._outstanding.settle(failed=True)
        return bool(self._waiting)

    def _place_back(self) -> None:
        """A queued request of this call was answered: its caller has a place back."""
        self.caller.outstanding -= 1
        turns = self._holdings.turns
        if turns is not None and turns.waiting:
            turns.grant()

    async def outcomes(self) -> list[RoundTripAnswer | Exception | None]:
        """Every admitted request's answer, or its own error (a :class:`RequestError`; any
        other exception is a bug in the worker), in the order admitted. For a call that is
        ``all_or_nothing``, as soon as one has failed: the others not settled by then are
        None (the call fails whole)."""
        outstanding = self._outstanding
        if outstanding is not None:
            await outstanding.wait(len(self._requests))
        if self._message is not None:  # every request is decoded, or never will be
            self._message.release()
        outcomes: list[RoundTripAnswer | Exception | None] = []
        for request in self._requests:
            if request.ticket is None or request.item is None or request.held is None:
                outcomes.append(request.error)
            elif request.ticket.future.done():
                outcomes.append(self._settle(request.item, request.held, request.ticket))
            else:
                outcomes.append(None)
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
            self._done_with(held, None)
            raise
        self._offer(item, answer)
        self._done_with(held, answer)
        return answer

    def _offer(self, item: RoundTripInput, answer: RoundTripAnswer) -> None:
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

    def _settle(
        self, item: RoundTripInput, held: Reservation, ticket: Ticket
    ) -> RoundTripAnswer | Exception:
        """A settled request of a call of many: its answer offered to the audit (it keeps
        holding its bytes until the answer is taken), or its error (it holds nothing from
        now)."""
        error = ticket.future.exception()
        if isinstance(error, Exception):
            held.release()
            return error
        answer = ticket.future.result()
        self._offer(item, answer)
        return answer

    def close(self) -> None:
        """Give back everything the call holds, and take its unanswered requests out of the
        queue."""
        if self._closed:
            return
        self._closed = True
        holdings = self._holdings
        if self._waiting and holdings.turns is not None:
            holdings.turns.leave(self)
        self._waiting.clear()
        forgotten = 0
        for ticket in self._queued:
            if not ticket.future.done():
                forgotten += 1
                assert holdings.batcher is not None
                holdings.batcher.forget(ticket)
        if self._outstanding is None:
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
        self._requests = []
        self._outstanding = None
