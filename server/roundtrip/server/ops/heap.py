"""Python's garbage collector, set for serving once warm-up has built the start-up heap.

CPython's cyclic collector runs a young-generation pass every 700 net allocations of
container objects and, now and then, a full pass over every object alive. After warm-up
the worker holds a few hundred thousand objects it keeps until it stops (JAX, its
modules, the compiled executables), while a call allocates a few dozen that reference
counting frees as soon as it is answered. On Python's defaults the collector's full
passes walk that whole heap on the event loop; frozen, with a young threshold of 10,000,
it is the calls' own objects alone (the measurement: docs/adr/0003-freeze-the-start-up-heap.md).

:func:`settle` collects once, freezes what survived (``gc.freeze``: the collector never
walks it again; reference counting still frees what is dropped) and raises the young
generation's threshold to ``gc_threshold``; 0 leaves the collector as Python set it.
:class:`Pauses` times every collection, for ``roundtrip_gc_seconds_total``.

>>> import gc
>>> before = gc.get_threshold()
>>> settle(10_000)["threshold"], gc.get_threshold()[0], gc.get_freeze_count() > 0
(10000, 10000, True)
>>> gc.unfreeze(); gc.set_threshold(*before)
>>> settle(0) == {"threshold": before[0], "frozen": 0}
True
"""

from __future__ import annotations

import gc
import time
from typing import Any

GENERATIONS = (0, 1, 2)


def settle(threshold: int) -> dict[str, int]:
    """Freeze the heap built so far and collect the young generation every ``threshold``
    allocations (0: change nothing); returns the collector's state, for the start log."""
    if threshold:
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(threshold, older, oldest)
    return state()


def state() -> dict[str, int]:
    """The young generation's threshold and how many objects are frozen."""
    return {"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}


class Pauses:
    """Seconds and passes of Python's garbage collector, by generation, from when
    :meth:`watch` runs until :meth:`unwatch`.

    A collection stops every thread; the one that ran it (most often the event loop)
    pays for it. Plain lists, not metrics: the callback runs inside the collection, in
    whichever thread allocated, where taking a metric's lock could deadlock.

    >>> pauses = Pauses()
    >>> pauses.watch(); _ = gc.collect(0); pauses.unwatch()
    >>> pauses.passes[0] >= 1, pauses.seconds[0] > 0
    (True, True)
    """

    def __init__(self) -> None:
        self.seconds = [0.0 for _ in GENERATIONS]
        self.passes = [0 for _ in GENERATIONS]
        self._started = 0.0

    def watch(self) -> None:
        gc.callbacks.append(self._timed)

    def unwatch(self) -> None:
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)

    def _timed(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        self.seconds[generation] += time.perf_counter() - self._started
        self.passes[generation] += 1
