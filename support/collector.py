"""What Python's cycle collector would have to free: the objects a block of code left in
reference cycles.

A worker's calls must be freed by reference counting as they end. Whatever a call leaves
in a cycle (its message, its request objects) stays in memory, uncounted by the byte
budget, until a collector pass, and those passes then run on the event loop.

>>> class Node:
...     pass
>>> with left_for_the_collector() as found:
...     ring, plain = Node(), Node()
...     ring.next = ring  # a cycle: reference counting cannot free it
...     del ring, plain
>>> sum(isinstance(thing, Node) for thing in found)
1
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def left_for_the_collector() -> Iterator[list[object]]:
    """The objects a collector pass finds unreachable once the block has run, in the list
    yielded (filled on leaving; it keeps them alive until it is dropped)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a pass finds unreachable stays in gc.garbage
    found: list[object] = []
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@contextmanager
def kept_alive(type_names: set[str]) -> Iterator[list[object]]:
    """The objects of ``type_names`` the block made that are still alive once it has run and
    a collector pass has freed its cycles, in the list yielded (filled on leaving).

    >>> class Node:
    ...     pass
    >>> kept = []
    >>> with kept_alive({"Node"}) as found:
    ...     kept.append(Node())
    ...     dropped = Node()
    ...     del dropped
    >>> found == kept
    True
    """
    gc.collect()
    before = {id(thing) for thing in gc.get_objects() if type(thing).__name__ in type_names}
    found: list[object] = []
    yield found
    gc.collect()
    found.extend(
        thing
        for thing in gc.get_objects()
        if type(thing).__name__ in type_names and id(thing) not in before
    )
