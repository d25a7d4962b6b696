"""What the metrics read at scrape time, and the shapes they read it in.

The engine's counters (compilations, caches) and the garbage collector's passes change on
other threads; a collector reads them when Prometheus scrapes, so the engine knows nothing
of Prometheus. The metrics layer sits below everything it watches (the engine, the
batcher, the budget, the audit) and imports none of them (``tests/test_layering.py``):
what it reads is declared here as protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class EngineCounts(Protocol):
    """A lane's engine counters (``Engine.stats``): written on its compute thread."""

    @property
    def compilations(self) -> int: ...
    @property
    def compile_seconds(self) -> float: ...
    @property
    def cache_hits(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def batched_proven(self) -> int: ...
    @property
    def batched_refused(self) -> int: ...


class ParamCounts(Protocol):
    """A lane's parameter cache (``Engine.params``)."""

    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def __len__(self) -> int: ...


class Lane(Protocol):
    """A compute lane's engine, read at scrape time."""

    @property
    def stats(self) -> EngineCounts: ...
    @property
    def params(self) -> ParamCounts: ...
    @property
    def cached(self) -> int: ...


class Budget(Protocol):
    """The byte budget's gauges (``ByteBudget``)."""

    @property
    def limit(self) -> int: ...
    @property
    def in_use(self) -> int: ...
    @property
    def computing(self) -> int: ...
    @property
    def peak(self) -> int: ...


class Batch(Protocol):
    """One engine run (``BatchRecord``): its size, each request's seconds queued, and its
    seconds computing."""

    @property
    def size(self) -> int: ...
    @property
    def queue_seconds(self) -> Sequence[float]: ...
    @property
    def compute_seconds(self) -> float: ...


class CollectorPasses(Protocol):
    """The garbage collector's seconds and passes by generation (``heap.Pauses``)."""

    @property
    def seconds(self) -> Sequence[float]: ...
    @property
    def passes(self) -> Sequence[int]: ...


class EngineCollector(Collector):
    """Reads every lane's engine counters when Prometheus scrapes (they change on the compute
    threads): summed over lanes, and each lane's batches and requests by its device."""

    def __init__(self, engines: Mapping[str, Lane]) -> None:
        self._engines = engines

    def _sum(self, read: Callable[[Lane], float]) -> float:
        return sum(read(engine) for engine in self._engines.values())

    def collect(self) -> Iterator[Any]:
        for name, help_text, read in (
            ("compilations", "XLA executables compiled.", lambda e: e.stats.compilations),
            (
                "compile_seconds",
                "Seconds spent compiling executables.",
                lambda e: e.stats.compile_seconds,
            ),
            (
                "executable_cache_hits",
                "Batches that found their executable compiled.",
                lambda e: e.stats.cache_hits,
            ),
            (
                "executable_cache_evictions",
                "Executables evicted by the max_compiled bound.",
                lambda e: e.stats.evictions,
            ),
            (
                "param_cache_hits",
                "Parameter sets found in the cache (a repeated seed).",
                lambda e: e.params.hits,
            ),
            (
                "param_cache_misses",
                "Parameter sets looked up and not found (cacheable shapes).",
                lambda e: e.params.misses,
            ),
            (
                "param_cache_evictions",
                "Parameter sets evicted by max_param_cache_bytes.",
                lambda e: e.params.evictions,
            ),
        ):
            yield CounterMetricFamily(f"roundtrip_{name}", help_text, value=self._sum(read))
        for name, help_text, read in (
            (
                "executable_cache_entries",
                "Executables held now (bounded by max_compiled).",
                lambda e: e.cached,
            ),
            (
                "param_cache_bytes",
                "Bytes of parameters cached now (max_param_cache_bytes).",
                lambda e: e.params.nbytes,
            ),
            ("param_cache_entries", "Parameter sets cached now.", lambda e: len(e.params)),
        ):
            yield GaugeMetricFamily(f"roundtrip_{name}", help_text, value=self._sum(read))
        batches = CounterMetricFamily(
            "roundtrip_lane_batches", "Batches each compute lane ran.", labels=["lane"]
        )
        requests = CounterMetricFamily(
            "roundtrip_lane_requests", "Requests each compute lane answered.", labels=["lane"]
        )
        for lane, engine in self._engines.items():
            batches.add_metric([lane], engine.stats.batches)
            requests.add_metric([lane], engine.stats.requests)
        yield batches
        yield requests
        proofs = CounterMetricFamily(
            "roundtrip_batched_programs",
            "Batched programs proven to give eager's bits on this device (they serve) or "
            "refused (the looped program serves their batches), per shape, batch size and "
            "parameter source.",
            labels=["outcome"],
        )
        proofs.add_metric(["proven"], self._sum(lambda e: e.stats.batched_proven))
        proofs.add_metric(["refused"], self._sum(lambda e: e.stats.batched_refused))
        yield proofs


class CollectorPauses(Collector):
    """Reads the collector's passes (``heap.Pauses``) when Prometheus scrapes (the collector
    writes them in any thread)."""

    def __init__(self, pauses: CollectorPasses) -> None:
        self._pauses = pauses

    def collect(self) -> Iterator[Any]:
        seconds = CounterMetricFamily(
            "roundtrip_gc_seconds",
            "Seconds Python's garbage collector ran, by generation: every thread waits for "
            "it, the event loop's calls included (gc_threshold).",
            labels=["generation"],
        )
        passes = CounterMetricFamily(
            "roundtrip_gc_collections",
            "Collections Python's garbage collector ran, by generation.",
            labels=["generation"],
        )
        for generation, (spent, count) in enumerate(
            zip(self._pauses.seconds, self._pauses.passes, strict=True)
        ):
            seconds.add_metric([str(generation)], spent)
            passes.add_metric([str(generation)], count)
        yield seconds
        yield passes
