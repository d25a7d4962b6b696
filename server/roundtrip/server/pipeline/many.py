"""The requests of one call of many (a RoundTripBatch, a V2 call of B seeds): admitted in
groups, queued in turn, counted as they settle (:class:`Outstanding`) and their outcomes
gathered in order (:class:`Many`).

Requests in a row that weigh the same are one group (:func:`groups`): one reservation, one
decode pass, one ticket per signature and one place in the turns, so that a call of many
costs Python work per group, not per request. Each request still has its own outcome: a
request that fails to decode, or that the engine refuses, gets its own error while the
others are answered. A group holds at most a batch's worth of requests (so it joins one
batch whole), its caller's share of the queue, and an eighth of the caller's share of the
byte budget (so large requests are admitted one by one, as if sent alone).

>>> from roundtrip.server.pipeline.admission import WorkingSet
>>> small, large = WorkingSet(12, 64, 16, False), WorkingSet(4096, 64, 16, False)
>>> sizes = [small, small, small, large, small]
>>> [len(group) for group in groups([(size, None) for size in sizes], 2, 1 << 20)]
[2, 1, 1, 1]
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from roundtrip.server.errors import RequestError
from roundtrip.server.ops.tracing import end_request, queued
from roundtrip.server.pipeline.admission import (
    ByteBudget,
    Caller,
    Reservation,
    WorkingSet,
    reserved_bytes,
)
from roundtrip.server.pipeline.tickets import Gathering, Queue, Ticket
from roundtrip.server.pipeline.turns import QueueTurns
from roundtrip.server.values import RoundTripAnswer, RoundTripInput, ShapeSignature

Admitted = tuple[WorkingSet, Callable[[], RoundTripInput]]
"""A request of a call of many as its door weighed it: its working set, and how to decode
it once admitted."""

T = TypeVar("T")


class Owner(Protocol):
    """The call whose requests they are
    (:class:`~roundtrip.server.pipeline.calls.Call`)."""

    caller: Caller
    deadline: float | None

    def request_span(self, held_bytes: int, compute_bytes: int) -> Any:
        """A request's span under the call's (None: not traced)."""
        ...

    def keep(self, held: Reservation, tickets: Sequence[Ticket], answer_bytes: int) -> None:
        """Hold ``held`` and ``tickets`` until the call closes."""
        ...

    def requests_traced(self) -> bool:
        """Whether the call's requests are traced (each its own span)."""
        ...

    def decoded(self) -> None:
        """Every request is decoded, or never will be."""
        ...

    def offer(self, item: RoundTripInput, answer: RoundTripAnswer) -> None:
        """An answer, offered to the audit."""
        ...


def groups(
    requests: Sequence[tuple[WorkingSet, T]], most_rows: int, most_bytes: int
) -> Iterator[list[tuple[WorkingSet, T]]]:
    """``requests`` in order, in groups of requests in a row that weigh the same, each of at
    most ``most_rows`` requests and ``most_bytes`` reserved (at least one request)."""
    group: list[tuple[WorkingSet, T]] = []
    group_bytes = each = 0
    last: WorkingSet | None = None
    for request in requests:
        size = request[0]
        if size is not last and size != last:
            last, each = size, sum(reserved_bytes(size)[:2])
            if group:
                yield group
                group, group_bytes = [], 0
        elif len(group) >= most_rows or group_bytes + each > most_bytes:
            yield group
            group, group_bytes = [], 0
        group.append(request)
        group_bytes += each
    if group:
        yield group


def _no_places(rows: int) -> None:
    """What a closed call's requests give back: nothing (the call gave their places back)."""


class Outstanding(Gathering):
    """A call's requests, counted as they settle (answered by the batcher, a ticket's at a
    time, or refused when their turn came), awaited as one; each answer gives the call's
    caller its places back in the queue. With ``all_or_nothing`` the wait ends at the first
    failure (the call fails whole; its other requests are taken out of the queue when it
    closes).

    ``asyncio.wait`` on their futures would add a callback to every one and run each as it
    is answered: 165 us more per 64-item message than this, on the event loop.
    """

    __slots__ = ("_done", "_expected", "_on_place_back", "all_or_nothing", "failed", "settled")

    def __init__(self, on_place_back: Callable[[int], None], all_or_nothing: bool) -> None:
        self._on_place_back = on_place_back
        self.all_or_nothing = all_or_nothing
        self.settled = 0
        self.failed = False
        self._expected = -1
        self._done: asyncio.Future[None] | None = None

    def report(self, failed: bool = False, rows: int = 1) -> None:
        self._on_place_back(rows)
        # settle(), inline: this runs for every answered ticket of every call of many
        self.settled += rows
        if failed:
            self.failed = True
        done = self._done
        if (
            done is not None
            and (self.settled >= self._expected or (failed and self.all_or_nothing))
            and not done.done()
        ):
            done.set_result(None)

    def settle(self, failed: bool, rows: int = 1) -> None:
        """``rows`` requests settled without an answer from the batcher (refused when their
        turn came)."""
        self.settled += rows
        self.failed = self.failed or failed
        done = self._done
        if done is not None and not done.done() and self._over():
            done.set_result(None)

    def _over(self) -> bool:
        return self.settled >= self._expected or (self.all_or_nothing and self.failed)

    def close(self) -> None:
        """Its call closed: what is still answered gives no place back through it (and it
        no longer keeps the call alive)."""
        self._on_place_back = _no_places

    async def wait(self, expected: int) -> None:
        """Until ``expected`` requests have settled (or, all or nothing, one has failed)."""
        self._expected = expected
        if not self._over():
            self._done = asyncio.get_running_loop().create_future()
            await self._done


class _Group:
    """Requests of the call admitted as one, in the order the door admitted them: waiting
    for their turn, queued (their items, the group's reservation, a ticket per signature),
    or refused whole when their turn came (``error``); a request that failed to decode has
    its own error among ``errors``."""

    __slots__ = ("decodes", "error", "errors", "items", "rows", "sizes", "tickets")

    def __init__(self, requests: Sequence[Admitted]) -> None:
        self.sizes = [size for size, _ in requests]
        self.decodes = [decode for _, decode in requests]
        self.rows = len(requests)
        self.items: list[RoundTripInput | None] = [None] * self.rows
        self.errors: list[Exception | None] = [None] * self.rows
        #: Each ticket and the rows it holds (one ticket, unless shapes that weigh the same
        #: differ).
        self.tickets: list[tuple[Ticket, list[int]]] = []
        self.error: Exception | None = None


class Many:
    """The requests of ``call``, a call of many: queued as the turns allow, the others
    waiting in the call (holding nothing but their place in it) and queued in order as
    places come back; counted as they settle, and awaited as one."""

    __slots__ = (
        "_batcher",
        "_budget",
        "_call",
        "_groups",
        "_outstanding",
        "_turns",
        "_waiting",
        "caller",
    )

    def __init__(
        self,
        call: Owner,
        *,
        budget: ByteBudget,
        batcher: Queue | None,
        turns: QueueTurns | None,
        all_or_nothing: bool,
    ) -> None:
        self._call: Owner | None = call
        self.caller = call.caller
        self._budget = budget
        self._batcher = batcher
        self._turns = turns
        self._groups: list[_Group] = []
        self._waiting: collections.deque[_Group] = collections.deque()
        self._outstanding = Outstanding(self._place_back, all_or_nothing)

    def admit(self, requests: Sequence[Admitted]) -> None:
        """Admit ``requests``, each weighed at its size (its decode reads its payload once
        admitted), in groups: queued now as far as the turns allow, the others when their
        turn comes; a refusal is that request's outcome in :meth:`outcomes`. A call whose
        trace is recorded admits its requests one by one, each with its own span."""
        turns = self._turns
        rows, nbytes = 1, 0
        assert self._call is not None
        if not self._call.requests_traced():
            rows = self._batcher.max_batch_size if self._batcher is not None else 1
            if turns is not None:
                rows = min(rows, turns.per_caller, turns.line)
            nbytes = self._budget.caller_limit // 8
        for requests_of_group in groups(requests, rows, nbytes):
            group = _Group(requests_of_group)
            if self._waiting:
                self._waiting.append(group)
            elif turns is not None and not turns.may_queue(self.caller, group.rows):
                self._waiting.append(group)
                turns.wait(self)
            else:
                self._queue(group)
            self._groups.append(group)

    @property
    def next_rows(self) -> int:
        """The places the next waiting group takes in the queue."""
        return self._waiting[0].rows

    def take_turn(self) -> bool:
        """Queue the next waiting group (a refusal is its outcome); whether more wait."""
        group = self._waiting.popleft()
        try:
            self._queue(group)
        except Exception as error:  # a bug: INTERNAL for these requests, not the grant
            group.error = error
            self._outstanding.settle(failed=True, rows=group.rows)
        return bool(self._waiting)

    def _queue(self, group: _Group) -> None:
        """Reserve what ``group`` holds and keep room for its computation, decode, and queue
        it; a refusal is settled as its outcome. The reservation is given back when the call
        closes (or now, if nothing of the group was queued)."""
        call = self._call
        assert call is not None
        held_bytes = compute = answer = 0
        computes = []
        last, reserved = None, (0, 0, 0)
        for size in group.sizes:
            if size is not last and size != last:
                last, reserved = size, reserved_bytes(size)
            held_bytes += reserved[0]
            compute += reserved[1]
            answer += reserved[2]
            computes.append(reserved[1])
        span = call.request_span(held_bytes, compute)
        try:
            held = self._budget.admit(held_bytes, compute, self.caller)
        except RequestError as error:
            group.error = error
            self._unqueued(group.rows, span, error)
            return
        refused: RequestError | None = None
        try:
            by_signature: dict[ShapeSignature, tuple[list[int], list[RoundTripInput]]] = {}
            for row, decode in enumerate(group.decodes):
                try:
                    item = group.items[row] = decode()
                except RequestError as error:
                    group.errors[row] = error
                    continue
                rows, items = by_signature.setdefault(item.signature, ([], []))
                rows.append(row)
                items.append(item)
            for rows, items in by_signature.values():
                try:
                    ticket = self._enqueue(items, held, sum(computes[row] for row in rows))
                except RequestError as error:
                    refused = error
                    for row in rows:
                        group.errors[row] = error
                    continue
                group.tickets.append((ticket, rows))
        except BaseException:
            held.release()
            raise
        if group.tickets:
            call.keep(held, [ticket for ticket, _ in group.tickets], answer)
            if span is not None:
                first = group.tickets[0][0]
                first.span, span = queued(span, first.item), None
        else:
            held.release()
        failed = group.rows - sum(len(rows) for _, rows in group.tickets)
        if failed:
            cause = refused or next(e for e in group.errors if e is not None)
            self._unqueued(failed, span, cause)

    def _enqueue(self, items: list[RoundTripInput], held: Reservation, compute: int) -> Ticket:
        """Queue ``items`` (decoded, of one signature) as one ticket."""
        batcher = self._batcher
        assert batcher is not None
        assert self._call is not None
        ticket = batcher.enqueue(
            items[0],
            deadline=self._call.deadline,
            gathering=self._outstanding,
            held=held,
            compute_bytes=compute,
            group=items,
        )
        self.caller.outstanding += ticket.rows
        return ticket

    def _unqueued(self, rows: int, span: Any, error: Exception) -> None:
        """``rows`` requests were refused before they were queued."""
        end_request(span, getattr(error, "message", repr(error)))
        self._outstanding.settle(failed=True, rows=rows)

    def _place_back(self, rows: int) -> None:
        """Queued requests of this call were answered: its caller has their places back."""
        self.caller.outstanding -= rows
        turns = self._turns
        if turns is not None and turns.waiting:
            turns.grant()

    async def outcomes(self) -> list[RoundTripAnswer | Exception | None]:
        """Once every request has settled (or, all or nothing, one has failed): each one's
        answer (offered to the audit), its own error (a :class:`RequestError`; any other
        exception is a bug in the worker), or None (not settled: the call failed whole
        first), in the order admitted."""
        await self._outstanding.wait(sum(group.rows for group in self._groups))
        call = self._call
        assert call is not None
        call.decoded()
        outcomes: list[RoundTripAnswer | Exception | None] = []
        for group in self._groups:
            if group.error is not None:
                outcomes += [group.error] * group.rows
                continue
            found = list(group.errors)
            for ticket, rows in group.tickets:
                future = ticket.future
                if future.done() and not future.cancelled():
                    for row, outcome in zip(rows, future.result(), strict=True):
                        item = group.items[row]
                        if item is not None and not isinstance(outcome, Exception):
                            call.offer(item, outcome)
                        found[row] = outcome
            outcomes += found
        return outcomes

    def close(self) -> None:
        """The call closed: its waiting requests wait no more, and the call's parts let go
        of each other (so reference counting frees them now)."""
        if self._waiting and self._turns is not None:
            self._turns.leave(self)
        self._waiting.clear()
        self._outstanding.close()
        self._groups = []
        self._call = None
