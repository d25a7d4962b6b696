"""A queued request as the batcher holds it (:class:`Ticket`: one request, or the
same-signature requests of one call of many queued as one, its ``group``), and what the
requests of one call report to as they are answered (:class:`Gathering`; a call of many's
own: :class:`~roundtrip.server.pipeline.many.Outstanding`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
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
