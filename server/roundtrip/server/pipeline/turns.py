"""Places in the shared queue for the requests of calls of many (a RoundTripBatch, a V2 call
of B seeds), granted in turn by caller, so that fairness is per caller, not per call.

A call of many queues its requests as places allow and keeps the rest waiting in the call,
holding nothing but their place in it. Calls of many together may fill the queue up to the
bulk line (``max_bulk_queue_share`` of ``max_queue_size``), so single calls always find a
place; one caller's calls of many may have at most ``max_queue_share`` of the queue queued
or computing at once. When places come back (a request answered, a batch taken from the
queue, a call gone), the waiting calls get them in turn, one caller after another, never
refused for want of a place: only their deadline ends their wait.

>>> from roundtrip.server.pipeline.admission import Caller
>>> queued = [0]
>>> turns = QueueTurns(queued=lambda: queued[0], line=2, per_caller=1)
>>> first, second = Caller("a"), Caller("b")
>>> turns.may_queue(first)
True
>>> first.outstanding, queued[0] = 1, 1  # a request of the first caller's call is queued
>>> turns.may_queue(first), turns.may_queue(second)
(False, True)
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Protocol

from roundtrip.server.pipeline.admission import Caller


class Waiting(Protocol):
    """A call with requests waiting for their turn."""

    caller: Caller

    @property
    def next_rows(self) -> int:
        """The places its next waiting requests take (a group's: as many as it holds)."""
        ...

    def take_turn(self) -> bool:
        """Queue its next waiting requests; whether it still has more waiting."""


class QueueTurns:
    """The calls of many waiting for places, by caller, and the rules that grant them."""

    def __init__(self, *, queued: Callable[[], int], line: int, per_caller: int) -> None:
        self._queued = queued
        self.line = line
        self.per_caller = per_caller
        #: Waiting calls by caller, callers in the order their turn comes.
        self.waiting: dict[Caller, collections.deque[Waiting]] = {}
        self._granting = False

    @property
    def waiting_calls(self) -> int:
        return sum(len(calls) for calls in self.waiting.values())

    def may_queue(self, caller: Caller, rows: int = 1) -> bool:
        """Whether ``rows`` requests of ``caller``'s call of many may be queued now, ahead of
        none."""
        return (
            caller not in self.waiting
            and caller.outstanding + rows <= self.per_caller
            and self._queued() + rows <= self.line
        )

    def wait(self, call: Waiting) -> None:
        """``call`` has requests waiting (it says so once, as its first one waits): it gets
        places in its caller's turn."""
        self.waiting.setdefault(call.caller, collections.deque()).append(call)

    def leave(self, call: Waiting) -> None:
        """``call`` is gone (closed): it waits no more."""
        calls = self.waiting.get(call.caller)
        if calls is not None and call in calls:
            calls.remove(call)
            if not calls:
                del self.waiting[call.caller]

    def grant(self) -> None:
        """Give the places free now to waiting calls, one caller after another."""
        if self._granting:  # a grant already runs further up this stack
            return
        self._granting = True
        try:
            while self.waiting:
                caller = next(
                    (
                        c
                        for c, calls in self.waiting.items()
                        if c.outstanding + calls[0].next_rows <= self.per_caller
                    ),
                    None,
                )
                if caller is None or self._queued() + self.waiting[caller][0].next_rows > self.line:
                    return
                calls = self.waiting.pop(caller)
                if calls[0].take_turn() is False:
                    calls.popleft()
                if calls:
                    self.waiting[caller] = calls  # to the back of the turn order
        finally:
            self._granting = False
