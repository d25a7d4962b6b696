"""The parameters of recent models, kept so a repeated seed skips their initialization.

Building ``nnx.Linear(width, features)`` from a seed draws ``width * features``
truncated-normal numbers; at 1024 x 1024 that is almost all of a request's
compute, and it is the same every time the seed repeats. The engine keeps the
initialized parameters here, keyed by everything that determines them, and runs
the forward, split/merge and reduction steps from them; the parameters are the
very arrays the initializer produced, so the answers keep their bits.

Least recently used goes first; the total is bounded in bytes. A set is cached
on its key's second sighting (:meth:`ParamCache.seen_before` remembers the
last :data:`SEEN_KEYS` keys): a seed seen once runs the one-executable path it
always ran, so traffic whose seeds never repeat pays nothing for the cache.
Pure Python: the values are whatever the engine stores (device arrays), and the
engine's compute thread is the only one that calls it.

>>> cache = ParamCache(max_bytes=100)
>>> cache.put(("seed", 1), "params-1", nbytes=60)
>>> cache.get(("seed", 1)), cache.get(("seed", 2))
('params-1', None)
>>> cache.put(("seed", 2), "params-2", nbytes=60)  # over 100 bytes: the oldest goes
>>> cache.get(("seed", 1)), cache.nbytes, (cache.hits, cache.misses, cache.evictions)
(None, 60, (1, 2, 1))

``on_evict`` runs once after a put that evicted, when the evicted sets are gone: the
worker gives their memory back to the OS there
(:func:`~roundtrip.server.ops.allocator.release_freed`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

#: Keys remembered for admission (a set is cached on its second sighting).
SEEN_KEYS = 16384


class ParamCache(Generic[V]):
    """An LRU map bounded by the bytes of its values; ``max_bytes=0`` keeps nothing."""

    def __init__(self, max_bytes: int, *, on_evict: Callable[[], object] | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: collections.OrderedDict[Hashable, tuple[V, int]] = collections.OrderedDict()
        self._seen: collections.OrderedDict[Hashable, None] = collections.OrderedDict()

    def seen_before(self, key: Hashable) -> bool:
        """Whether ``key`` was looked at recently; records that it was now.

        >>> cache = ParamCache(max_bytes=100)
        >>> cache.seen_before("a"), cache.seen_before("a")
        (False, True)
        """
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        self._seen[key] = None
        if len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, nbytes: int) -> bool:
        """Whether a value of ``nbytes`` can be kept at all."""
        return 0 < nbytes <= self.max_bytes

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: V, *, nbytes: int) -> None:
        """Keep ``value``, evicting the least recently used until it fits (never one that
        cannot fit at all)."""
        if not self.fits(nbytes) or key in self._entries:
            return
        evictions = self.evictions
        while self.nbytes + nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1][1]  # no reference kept
            self.evictions += 1
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        if self.evictions != evictions and self._on_evict is not None:
            self._on_evict()
