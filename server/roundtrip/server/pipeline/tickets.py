"""A queued request as the batcher holds it (:class:`Ticket`: one request, or the
same-signature requests of one call of many queued as one, its ``group``), and what the
requests of one call report to as they are answered (:class:`Gathering`; a call's own:
:class:`Outstanding`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from roundtrip.server.errors import DeadlineExpired, RequestError
from roundtrip.server.ops.tracing import end_request
from roundtrip.server.pipeline.admission import Reservation
from roundtrip.server.pipeline.lanes import Outcome
from roundtrip.server.values import RoundTripInput


class Gathering:
    """What the requests one call queued together (a RoundTripBatch, a V2 call) report to:
    each is counted as it is answered (``failed``: with an error), so that the call awaits
    one thing, not one future per request.

    >>> Gathering().report(failed=False)
    """

    __slots__ = ()

    def report(self, failed: bool = False, rows: int = 1) -> None:
        """A ticket of ``rows`` requests is answered (``failed``: one or more with its own
        error)."""


@dataclass(slots=True)
class Ticket:
    """One queued request: its answer (or error) arrives on ``future``. With a ``group``
    (``item`` its first), the ticket is that many requests of one signature queued as one
    (a call of many's): they join one batch together, and ``future`` gets their outcomes
    in order, each an answer or that request's own error."""

    item: RoundTripInput
    future: asyncio.Future[Any]
    arrived: float
    deadline: float | None
    gathering: Gathering | None = None
    #: What the request holds while it waits, and the bytes its computation needs beyond
    #: them: the batch it joins reserves those before it runs.
    held: Reservation | None = None
    compute_bytes: int = 0
    #: The request's trace span (None: tracing is off), ended with its outcome.
    span: Any = None
    group: list[RoundTripInput] | None = None

    @property
    def rows(self) -> int:
        """The requests it holds: its place in the queue and in a batch."""
        return 1 if self.group is None else len(self.group)

    def inputs(self) -> list[RoundTripInput]:
        return [self.item] if self.group is None else self.group

    def resolve_all(self, outcomes: Sequence[Outcome]) -> None:
        """Hand each request its outcome (``outcomes``: one per row, in order)."""
        if self.group is None:
            self.resolve(outcomes[0])
            return
        self.future.set_result(outcomes)
        failed = next((o for o in outcomes if isinstance(o, RequestError)), None)
        if self.span is not None:
            end_request(self.span, None if failed is None else failed.message)
        if self.gathering is not None:
            self.gathering.report(failed is not None, len(outcomes))

    def fail(self, error: RequestError) -> None:
        """Every request of the ticket ends with ``error`` (its deadline passed, say)."""
        self.resolve_all([error] * self.rows)

    def resolve(self, outcome: Outcome) -> None:
        """Hand the request its answer or error (and count it down in its gathering)."""
        if isinstance(outcome, RequestError):
            self.future.set_exception(outcome)
            failed = True
        else:
            self.future.set_result(outcome)
            failed = False
        if self.span is not None:
            end_request(self.span, outcome.message if failed else None)  # type: ignore[union-attr]
        if self.gathering is not None:
            self.gathering.report(failed)


def live(batch: list[Ticket]) -> list[Ticket]:
    """``batch`` without requests whose caller left; those whose deadline passed are
    answered DEADLINE_EXCEEDED."""
    now = time.monotonic()
    live = []
    for ticket in batch:
        if ticket.future.done():
            continue
        if ticket.deadline is not None and ticket.deadline <= now:
            ticket.fail(DeadlineExpired("the deadline passed while the request was queued"))
            continue
        live.append(ticket)
    return live


def settle_batch(batch: Sequence[Ticket], outcomes: Sequence[Outcome]) -> None:
    """Hand each ticket of a computed ``batch`` its outcomes (one per request, in the
    batch's order); a ticket whose caller went away (cancelled) gets none."""
    at = 0
    for ticket in batch:
        rows = ticket.rows
        if not ticket.future.done():
            if ticket.group is None:
                ticket.resolve(outcomes[at])
            else:
                ticket.resolve_all(outcomes[at : at + rows])
        at += rows


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


class Queue(Protocol):
    """The shared queue a call's requests join
    (:class:`~roundtrip.server.pipeline.batcher.Batcher`)."""

    #: The most requests one batch (and so one group ticket) holds.
    max_batch_size: int

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
        """Queue ``item`` (or the ``group`` it heads); its answer (or error, or the group's
        outcomes) arrives on the ticket's future."""
        ...

    def forget(self, ticket: Ticket) -> None:
        """Take a request whose call went away out of the queue."""
        ...
