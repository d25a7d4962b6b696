"""The engine: the RoundTrip computation, compiled once per shape and batch size, and the
parameters of seeds that repeat, kept.

The contract (``SPEC.md``) is the eager reference: build ``nnx.Linear`` from the seed, run
it, ``nnx.split`` / ``nnx.merge`` it, run the merged model and compare. The engine runs
exactly those steps (:mod:`~roundtrip.server.numerics.programs`), fenced so XLA cannot
rewrite across them (:mod:`~roundtrip.server.numerics.fencing`), compiled ahead of time per
:class:`~roundtrip.server.values.ShapeSignature` and batch size
(:mod:`~roundtrip.server.numerics.executables`) and kept in a bounded LRU cache, so a warm request
does no Python model building at all. docs/numerics.md explains why each piece keeps the
eager reference's bits.

Drawing the parameters is most of a request's work, and it repeats whenever a seed does.
So the engine keeps the sets of seeds that repeat in a byte-bounded :class:`ParamCache` and
runs steps 1-4 from them. Sets of at least :data:`PARAM_CACHE_MIN_ELEMENTS` stay on the
device, drawn by an executable of their own, and a seed's requests run together from its
one set; smaller sets (from :data:`ROW_CACHE_MIN_ELEMENTS`) come back as host copies from
the executable that drew them and are stacked per batch (docs/adr/0004).

One compute thread runs the engine's batches (see ``batcher``); a second, the compile
thread, may :meth:`Engine.prepare` a signature never seen while the first runs others:
the caches' bookkeeping is under a lock, the compilations and runs are not. Executables
are evicted least recently used first among those used once (a caller's one-off shapes),
so the programs that serve repeated traffic stay compiled.

A batch of more than one request runs as one batched program (every request's draws and
matmuls at once) where that program has proven, on this device, that it gives eager's
bits (:mod:`~roundtrip.server.engine.proof`), and as the looped program (each request on
its own) everywhere else: a signature whose proof fails, and batches whose parameter sets
together exceed ``batched_max_bytes`` (on a CPU a batched draw that large runs slower than
the loop). docs/adr/0011 has the argument and its limits.

>>> import numpy as np
>>> engine = Engine(max_compiled=8)
>>> [r] = engine.run([RoundTripInput(0, np.array([1.0, 2.0, 3.0], np.float32), 4)])
>>> r.orig_sum, r.merged_sum, r.max_abs_diff
(-4.221933364868164, -4.221933364868164, 0.0)
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import jax

from roundtrip.server.engine.param_cache import ParamCache
from roundtrip.server.engine.proof import ProvenPrograms
from roundtrip.server.numerics.executables import (
    CompiledInit,
    CompiledRoundTrip,
    ParamSource,
    ProgramKey,
)
from roundtrip.server.numerics.programs import seed_operand
from roundtrip.server.ops import allocator
from roundtrip.server.values import RoundTripAnswer, RoundTripInput, ShapeSignature

T = TypeVar("T")


@dataclass(slots=True)
class EngineStats:
    """Counters the metrics layer reads; only the compute thread writes them."""

    compilations: int = 0
    compile_seconds: float = 0.0
    cache_hits: int = 0
    evictions: int = 0
    batches: int = 0
    requests: int = 0
    #: Batched programs that proved eager's bits (and serve), and that did not (the looped
    #: program serves their batches).
    batched_proven: int = 0
    batched_refused: int = 0

    @classmethod
    def total(cls, stats: Iterable[EngineStats]) -> EngineStats:
        """Every lane's counters added up."""
        total = cls()
        for one in stats:
            total.compilations += one.compilations
            total.compile_seconds += one.compile_seconds
            total.cache_hits += one.cache_hits
            total.evictions += one.evictions
            total.batches += one.batches
            total.requests += one.requests
            total.batched_proven += one.batched_proven
            total.batched_refused += one.batched_refused
        return total


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes that get an executable: powers of two up to ``max_batch_size``, and it.

    Padding a batch up to the next bucket bounds the number of compilations per
    signature to about log2(max_batch_size).
    """
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


#: Parameter sets of at least this many elements are cached (when the cache is on)...
ROW_CACHE_MIN_ELEMENTS = 1024
#: ...and from this size on they stay on the device and a seed's requests run together
#: from its one set; below it, sets are kept as host copies and stacked per batch.
PARAM_CACHE_MIN_ELEMENTS = 65536

ParamKey = tuple[int, int, int, str]
"""What determines a parameter set: the seed's effective bits, width, features, dtype."""


def param_key(seed: int, width: int, features: int) -> ParamKey:
    """Seeds that build the same key share parameters (``0`` and ``2**32`` without x64).

    >>> param_key(2**32 + 5, 1024, 8) == param_key(5, 1024, 8)
    True
    """
    return (int(seed_operand(seed)), width, features, "float32")


class Engine:
    """Runs batches of same-signature requests through cached executables.

    ``device`` is where its executables run (one engine per device: a compute lane);
    ``max_compiled`` bounds the executables kept (least recently used is evicted first);
    ``max_batch_size`` sets the largest batch and its buckets. ``max_param_cache_bytes``
    bounds the parameter sets kept (:class:`~roundtrip.server.engine.param_cache.ParamCache`)
    for signatures of at least :data:`PARAM_CACHE_MIN_ELEMENTS` parameters: their requests
    are grouped by seed, a seed that repeats runs from its parameters (drawn once, then
    reused), a seed seen for the first time runs as it always did, and the answers have
    the same bits either way. ``batched_max_bytes`` bounds the parameter bytes a batched
    program draws or reads at once (0: every batch runs looped).
    """

    def __init__(
        self,
        *,
        max_compiled: int,
        max_batch_size: int = 1,
        max_param_cache_bytes: int = 0,
        batched_max_bytes: int = 0,
        device: jax.Device | None = None,
    ) -> None:
        if max_compiled < 1 or max_batch_size < 1:
            raise ValueError("max_compiled and max_batch_size must be >= 1")
        self.device = device
        self.max_compiled = max_compiled
        self.buckets = batch_buckets(max_batch_size)
        self.stats = EngineStats()
        #: Which program each key runs: batched where proven here, looped otherwise.
        self.programs = ProvenPrograms(batched_max_bytes, self.stats, device)
        # device arrays (shared tier) or host copies (rows tier): both are read as arrays
        self.params: ParamCache[tuple[Any, ...]] = ParamCache(
            max_param_cache_bytes, on_evict=allocator.release_freed
        )
        self._cache: collections.OrderedDict[ProgramKey, CompiledRoundTrip] = (
            collections.OrderedDict()
        )
        self._inits: collections.OrderedDict[tuple[int, int], CompiledInit] = (
            collections.OrderedDict()
        )
        #: Executables used more than once (or compiled at warm-up): evicted last.
        self._proven: set[Any] = set()
        self._lock = threading.Lock()

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    @property
    def cached(self) -> int:
        return len(self._cache) + len(self._inits)

    def bucket_for(self, count: int) -> int:
        """The smallest bucket that holds ``count`` requests."""
        for size in self.buckets:
            if size >= count:
                return size
        raise ValueError(f"batch of {count} exceeds max_batch_size {self.max_batch_size}")

    def param_tier(self, signature: ShapeSignature) -> ParamSource | None:
        """How requests of ``signature`` use the parameter cache: ``shared`` (large sets, on
        the device, one per seed group), ``rows`` (small sets, host copies stacked per
        batch), or ``None`` (tiny sets, or the cache is off: drawn per request)."""
        elements = (signature.x_shape[-1] + 1) * signature.features
        if elements < ROW_CACHE_MIN_ELEMENTS or not self.params.fits(elements * 4):
            return None
        return "shared" if elements >= PARAM_CACHE_MIN_ELEMENTS else "rows"

    def caches_params(self, signature: ShapeSignature) -> bool:
        """Whether requests of ``signature`` may run from cached parameters."""
        return self.param_tier(signature) is not None

    def knows(self, signature: ShapeSignature) -> bool:
        """Whether ``signature`` has an executable here (its next batch needs no compilation
        of a new shape, at most one of another batch size)."""
        with self._lock:
            return any(key[0] == signature for key in self._cache)

    def prepare(self, signature: ShapeSignature, batch_size: int, *, keep: bool = False) -> None:
        """Compile what a batch of ``signature`` at ``batch_size`` may run (warm-up, or the
        compile thread for a signature never seen); ``keep``: evicted last, as if used."""
        tier = self.param_tier(signature)
        if tier == "shared":
            self.initializer(signature.x_shape[-1], signature.features, keep=keep)
        if tier is not None:
            self.executable(signature, batch_size, source=tier, keep=keep)
        self.executable(signature, batch_size, emit_params=tier == "rows", keep=keep)

    def executable(
        self,
        signature: ShapeSignature,
        batch_size: int,
        *,
        source: ParamSource = "seed",
        emit_params: bool = False,
        keep: bool = False,
    ) -> CompiledRoundTrip:
        """The cached executable for ``signature`` at ``batch_size``, compiling it if needed."""
        key = ProgramKey(signature, batch_size, source, emit_params)
        found = self._cached(self._cache, key, keep)
        if found is not None:
            return found
        width, features = signature.x_shape[-1], signature.features
        compiled = self._compile(
            lambda: self.programs.build(
                key, draw=lambda seed: self.initializer(width, features)(seed)
            )
        )
        self._keep(self._cache, key, compiled, keep)
        return compiled

    def _cached(self, cache: collections.OrderedDict[Any, T], key: Any, keep: bool) -> T | None:
        """``cache``'s entry for ``key`` (now the most recently used; proven from its second
        use, or when ``keep``), or None."""
        with self._lock:
            found = cache.get(key)
            if found is not None:
                cache.move_to_end(key)
                self.stats.cache_hits += 1
                self._proven.add(key)
            elif keep:
                self._proven.add(key)
            return found

    def _keep(self, cache: collections.OrderedDict[Any, T], key: Any, value: T, keep: bool) -> None:
        with self._lock:
            cache[key] = value
            if keep:
                self._proven.add(key)
            self._evict()

    def initializer(self, width: int, features: int, *, keep: bool = False) -> CompiledInit:
        """The compiled parameter initializer for (width, features)."""
        key = (width, features)
        found = self._cached(self._inits, key, keep)
        if found is not None:
            return found
        compiled = self._compile(lambda: CompiledInit(width, features, self.device))
        self._keep(self._inits, key, compiled, keep)
        return compiled

    def _compile(self, build: Callable[[], T]) -> T:
        started = time.perf_counter()
        compiled = build()
        with self._lock:
            self.stats.compile_seconds += time.perf_counter() - started
            self.stats.compilations += 1
        return compiled

    def _evict(self) -> None:
        """Down to ``max_compiled``: the least recently used executable among those used
        once, or among all when every one is proven (under the lock)."""
        while self.cached > self.max_compiled:
            cache: collections.OrderedDict[Any, Any] = (
                self._inits
                if self._inits and (not self._cache or len(self._inits) > len(self._cache))
                else self._cache
            )
            key = next((key for key in cache if key not in self._proven), None)
            if key is None:
                key = next(iter(cache))
            del cache[key]
            self._proven.discard(key)
            self.stats.evictions += 1

    def counts(self) -> dict[str, int]:
        """What a traced batch reports, by how much each grew while it ran."""
        return {
            "compilations": self.stats.compilations,
            "executable_cache_hits": self.stats.cache_hits,
            "param_cache_hits": self.params.hits,
            "param_cache_misses": self.params.misses,
        }

    def run(self, inputs: Sequence[RoundTripInput]) -> list[RoundTripAnswer]:
        """Answer ``inputs`` (one signature, at most ``max_batch_size``) in order."""
        if not inputs:
            return []
        signature = inputs[0].signature
        if any(item.signature != signature for item in inputs):
            raise ValueError("a batch must hold one shape signature")
        tier = self.param_tier(signature)
        if tier == "shared":
            results = self._run_shared(signature, inputs)
        elif tier == "rows":
            results = self._run_rows(signature, inputs)
        else:
            results = self.executable(signature, self.bucket_for(len(inputs)))(inputs)
        self.stats.batches += 1
        self.stats.requests += len(inputs)
        return results

    def _run_shared(
        self, signature: ShapeSignature, inputs: Sequence[RoundTripInput]
    ) -> list[RoundTripAnswer]:
        """Group ``inputs`` by parameter set and run each group from its parameters: cached
        ones, or drawn now and cached when the set repeats (seen before, or more than once in
        this batch). Sets seen for the first time run together as before, from their seeds.
        """
        width, features = signature.x_shape[-1], signature.features
        groups: dict[ParamKey, list[int]] = {}
        for row, item in enumerate(inputs):
            groups.setdefault(param_key(item.seed, width, features), []).append(row)
        answers: list[RoundTripAnswer | None] = [None] * len(inputs)
        first_seen: list[int] = []
        for key, rows in groups.items():
            params = self.params.get(key)
            if params is None:
                if not self.params.seen_before(key) and len(rows) == 1:
                    first_seen += rows
                    continue
                params = self.initializer(width, features)(inputs[rows[0]].seed)
                self.params.put(key, params, nbytes=sum(p.nbytes for p in params))
            group = [inputs[row] for row in rows]
            compiled = self.executable(signature, self.bucket_for(len(group)), source="shared")
            for row, answer in zip(rows, compiled(group, params), strict=True):
                answers[row] = answer
        if first_seen:
            group = [inputs[row] for row in first_seen]
            compiled = self.executable(signature, self.bucket_for(len(group)))
            for row, answer in zip(first_seen, compiled(group), strict=True):
                answers[row] = answer
        return [answer for answer in answers if answer is not None]

    def _run_rows(
        self, signature: ShapeSignature, inputs: Sequence[RoundTripInput]
    ) -> list[RoundTripAnswer]:
        """Requests whose sets are cached run together from them (stacked); the others run
        from their seeds in one executable that also hands back the sets it drew, and a set
        is kept when its seed repeats."""
        width, features = signature.x_shape[-1], signature.features
        keys = [param_key(item.seed, width, features) for item in inputs]
        found = [self.params.get(key) for key in keys]
        answers: list[RoundTripAnswer | None] = [None] * len(inputs)
        hits = [row for row, params in enumerate(found) if params is not None]
        if hits:
            compiled = self.executable(signature, self.bucket_for(len(hits)), source="rows")
            group = [inputs[row] for row in hits]
            for row, answer in zip(
                hits, compiled(group, [found[row] for row in hits]), strict=True
            ):
                answers[row] = answer
        drawn = [row for row, params in enumerate(found) if params is None]
        if drawn:
            compiled = self.executable(signature, self.bucket_for(len(drawn)), emit_params=True)
            group_answers, sets = compiled.run([inputs[row] for row in drawn])
            repeated = {key for key in (keys[row] for row in drawn) if self.params.seen_before(key)}
            for row, answer, params in zip(drawn, group_answers, sets, strict=True):
                answers[row] = answer
                if keys[row] in repeated:
                    self.params.put(keys[row], params, nbytes=sum(p.nbytes for p in params))
        return [answer for answer in answers if answer is not None]
