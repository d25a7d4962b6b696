"""A queued request as the batcher holds it (:class:`Ticket`), and what the requests of one
call report to as they are answered (:class:`Gathering`; a call's own: :class:`Outstanding`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from roundtrip.server.errors import DeadlineExpired, RequestError
from roundtrip.server.ops.tracing import end_request
from roundtrip.server.pipeline.admission import Reservation
from roundtrip.server.pipeline.lanes import Outcome
from roundtrip.server.values import RoundTripAnswer, RoundTripInput


class Gathering:
    """What the requests one call queued together (a RoundTripBatch, a V2 call) report to:
    each is added as it is queued and counted as it is answered (``failed``: with an
    error), so that the call awaits one thing, not one future per request.

    >>> gathering = Gathering()
    >>> gathering.add(); gathering.report(failed=False)
    """

    __slots__ = ()

    def add(self) -> None:
        """A request is queued."""

    def report(self, failed: bool = False) -> None:
        """A request is answered (``failed``: with its own error)."""


@dataclass(slots=True)
class Ticket:
    """One queued request: its answer (or error) arrives on ``future``."""

    item: RoundTripInput
    future: asyncio.Future[RoundTripAnswer]
    arrived: float
    deadline: float | None
    gathering: Gathering | None = None
    #: What the request holds while it waits, and the bytes its computation needs beyond
    #: them: the batch it joins reserves those before it runs.
    held: Reservation | None = None
    compute_bytes: int = 0
    #: The request's trace span (None: tracing is off), ended with its outcome.
    span: Any = None

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
            ticket.resolve(DeadlineExpired("the deadline passed while the request was queued"))
            continue
        live.append(ticket)
    return live


class Outstanding(Gathering):
    """A call's requests, counted as they settle (answered by the batcher, or refused when
    their turn came), awaited as one; each answer gives the call's caller a place back in
    the queue. With ``all_or_nothing`` the wait ends at the first failure (the call fails
    whole; its other requests are taken out of the queue when it closes).

    ``asyncio.wait`` on their futures would add a callback to every one and run each as it
    is answered: 165 us more per 64-item message than this, on the event loop.
    """

    __slots__ = ("_done", "_expected", "_on_place_back", "all_or_nothing", "failed", "settled")

    def __init__(self, on_place_back: Callable[[], None], all_or_nothing: bool) -> None:
        self._on_place_back = on_place_back
        self.all_or_nothing = all_or_nothing
        self.settled = 0
        self.failed = False
        self._expected = -1
        self._done: asyncio.Future[None] | None = None

    def add(self) -> None:
        """A request of the call is queued (counted when it settles)."""

    def report(self, failed: bool = False) -> None:
        self._on_place_back()
        # settle(), inline: this runs for every answered request of every call of many
        self.settled += 1
        if failed:
            self.failed = True
        done = self._done
        if (
            done is not None
            and (self.settled >= self._expected or (failed and self.all_or_nothing))
            and not done.done()
        ):
            done.set_result(None)

    def settle(self, failed: bool) -> None:
        """A request settled without an answer from the batcher (refused when its turn
        came)."""
        self.settled += 1
        self.failed = self.failed or failed
        done = self._done
        if done is not None and not done.done() and self._over():
            done.set_result(None)

    def _over(self) -> bool:
        return self.settled >= self._expected or (self.all_or_nothing and self.failed)

    async def wait(self, expected: int) -> None:
        """Until ``expected`` requests have settled (or, all or nothing, one has failed)."""
        self._expected = expected
        if not self._over():
            self._done = asyncio.get_running_loop().create_future()
            await self._done


class Queue(Protocol):
    """The shared queue a call's requests join
    (:class:`~roundtrip.server.pipeline.batcher.Batcher`)."""

    def enqueue(
        self,
        item: RoundTripInput,
        *,
        deadline: float | None = None,
        gathering: Gathering | None = None,
        held: Reservation | None = None,
        compute_bytes: int = 0,
    ) -> Ticket:
        """Queue ``item``; its answer (or error) arrives on the ticket's future."""
        ...

    def forget(self, ticket: Ticket) -> None:
        """Take a request whose call went away out of the queue."""
        ...
