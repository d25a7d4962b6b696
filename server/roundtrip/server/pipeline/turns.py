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

#: Requests a waiting caller may queue in one turn before the next caller's turn.
TURN = 8
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

#: Requests a waiting caller may queue in one turn before the next caller's turn.
TURN = 8


class Waiting(Protocol):
    """A call with requests waiting for their turn."""

    caller: Caller

    def take_turn(self) -> bool:
        """Queue its next waiting request; whether it still has more waiting."""


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

    def may_queue(self, caller: Caller) -> bool:
        """Whether a request of ``caller``'s call of many may be queued now, ahead of none."""
        return (
            caller not in self.waiting
            and caller.outstanding < self.per_caller
            and self._queued() < self.line
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
            while self.waiting and self._queued() < self.line:
                caller = next((c for c in self.waiting if c.outstanding < self.per_caller), None)
                if caller is None:
                    return
                calls = self.waiting.pop(caller)
                if calls[0].take_turn() is False:
                    calls.popleft()
                if calls:
                    self.waiting[caller] = calls  # to the back of the turn order
        finally:
            self._granting = False
