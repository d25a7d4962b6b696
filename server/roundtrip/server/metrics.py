"""Prometheus metrics, served in the text format on their own HTTP port.

One :class:`WorkerMetrics` per worker, on its own registry. The pipeline and
the batcher report into it; the engine's counters (compilations, cache) are
read at scrape time by a collector, so the engine knows nothing of Prometheus.
Names follow Prometheus conventions: base units, ``_total`` for counters,
``_seconds`` for durations. The README's metric table is checked against
:data:`METRIC_NAMES`.

>>> metrics = WorkerMetrics(max_batch_size=8)
>>> metrics.observe_rpc("RoundTrip", "OK", 0.002)
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # names only: the metrics layer imports neither JAX nor the engine
    from roundtrip.server.admission import ByteBudget
    from roundtrip.server.audit import AuditOutcome
    from roundtrip.server.batcher import BatchRecord
    from roundtrip.server.engine import Engine
    from roundtrip.server.heap import Pauses

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: The numerics identity's fields that label roundtrip_numerics_info (XLA_FLAGS is free text).
NUMERICS_LABELS = ("backend", "device_kind", "xla_cpu_max_isa", "host_cpu_isa", "fingerprint")

METRIC_NAMES = (
    "roundtrip_requests_total",
    "roundtrip_request_duration_seconds",
    "roundtrip_inflight_requests",
    "roundtrip_queued_requests",
    "roundtrip_queue_wait_seconds",
    "roundtrip_admitted_bytes",
    "roundtrip_admitted_bytes_peak",
    "roundtrip_admitted_bytes_limit",
    "roundtrip_stalled",
    "roundtrip_unread_answers_total",
    "roundtrip_computing_bytes",
    "roundtrip_numerics_info",
    "roundtrip_batch_size",
    "roundtrip_batch_compute_seconds",
    "roundtrip_compilations_total",
    "roundtrip_compile_seconds_total",
    "roundtrip_executable_cache_hits_total",
    "roundtrip_executable_cache_evictions_total",
    "roundtrip_executable_cache_entries",
    "roundtrip_param_cache_hits_total",
    "roundtrip_param_cache_misses_total",
    "roundtrip_param_cache_evictions_total",
    "roundtrip_param_cache_bytes",
    "roundtrip_param_cache_entries",
    "roundtrip_lane_batches_total",
    "roundtrip_lane_requests_total",
    "roundtrip_audit_checks_total",
    "roundtrip_audit_mismatches_total",
    "roundtrip_audit_skipped_total",
    "roundtrip_unauthenticated_total",
    "roundtrip_gc_seconds_total",
    "roundtrip_gc_collections_total",
)


class _EngineCollector(Collector):
    """Reads every lane's engine counters when Prometheus scrapes (they change on the compute
    threads): summed over lanes, and each lane's batches and requests by its device."""

    def __init__(self, engines: Mapping[str, Engine]) -> None:
        self._engines = engines

    def _sum(self, read: Callable[[Engine], float]) -> float:
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


class _CollectorPauses(Collector):
    """Reads :class:`Pauses` when Prometheus scrapes (the collector writes it in any thread)."""

    def __init__(self, pauses: Pauses) -> None:
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


#: The RPCs that carry inference requests: what Triton's statistics extension counts.
INFERENCE_METHODS = frozenset(
    {"RoundTrip", "RoundTripStream", "RoundTripBatch", "ModelInfer", "ModelInferHTTP"}
)


@dataclass(slots=True)
class Duration:
    """A count and the nanoseconds it took in all (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9) * count


@dataclass(slots=True)
class InferenceTally:
    """The worker's inference counters as Triton's statistics extension reports them: calls
    answered OK and not (with their durations), requests queued and computed, batches run
    by size. Fed by the same observations as the Prometheus metrics, on the event loop.

    >>> tally = InferenceTally()
    >>> tally.observe_call("RoundTrip", "OK", 0.002)
    >>> tally.success, tally.last_inference_ms > 0
    (Duration(count=1, ns=2000000), True)
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def observe_call(self, method: str, code: str, seconds: float, count: int = 1) -> None:
        if method not in INFERENCE_METHODS:
            return
        if code == "OK":
            self.success.add(seconds, count)
            self.last_inference_ms = int(time.time() * 1000)
        else:
            self.fail.add(seconds, count)

    def observe_batch(self, size: int, queue_seconds: Sequence[float], compute: float) -> None:
        self.execution_count += 1
        self.inference_count += size
        for seconds in queue_seconds:
            self.queue.add(seconds)
        self.compute_infer.add(compute, size)
        self.batches.setdefault(size, Duration()).add(compute)


class WorkerMetrics:
    """Every metric the worker exports, on one registry."""

    def __init__(self, *, max_batch_size: int) -> None:
        disable_created_metrics()  # the *_created series carry nothing an operator uses here
        self._server: WSGIServer | None = None
        #: The same counts for V2's statistics extension (ModelStatistics).
        self.tally = InferenceTally()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "roundtrip_requests",
            "Requests answered, by RPC (stream messages count one each) and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "roundtrip_request_duration_seconds",
            "Seconds from receiving a request to its answer, by RPC.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "roundtrip_inflight_requests",
            "Requests received and not yet answered.",
            registry=self.registry,
        )
        self.queued = Gauge(
            "roundtrip_queued_requests",
            "Requests waiting for the engine (max_queue_size refuses beyond).",
            registry=self.registry,
        )
        self.admitted_bytes = Gauge(
            "roundtrip_admitted_bytes",
            "Bytes of admitted work held now: messages, waiting requests' inputs, running "
            "batches' working sets and unwritten answers.",
            registry=self.registry,
        )
        self.computing_bytes = Gauge(
            "roundtrip_computing_bytes",
            "The part of roundtrip_admitted_bytes that running batches hold (their "
            "computations' working sets).",
            registry=self.registry,
        )
        self.admitted_bytes_peak = Gauge(
            "roundtrip_admitted_bytes_peak",
            "The most roundtrip_admitted_bytes has been since the worker started (never above "
            "roundtrip_admitted_bytes_limit: every byte is reserved before it is held).",
            registry=self.registry,
        )
        self.admitted_bytes_limit = Gauge(
            "roundtrip_admitted_bytes_limit",
            "max_inflight_bytes: admission refuses (RESOURCE_EXHAUSTED) beyond it.",
            registry=self.registry,
        )
        self.unread_answers = Counter(
            "roundtrip_unread_answers",
            "Answers their caller did not take within write_timeout_s, by method: the stream "
            "was ended, or the REST connection closed.",
            ["method"],
            registry=self.registry,
        )
        self.stalled = Gauge(
            "roundtrip_stalled",
            "1 while requests have waited max_stall_s with no batch running, starting or "
            "finishing (health then says NOT_SERVING), else 0.",
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "roundtrip_queue_wait_seconds",
            "Seconds a request waited in the queue before its batch ran.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        sizes = [1.0]
        while sizes[-1] < max_batch_size:
            sizes.append(sizes[-1] * 2)
        self.batch_size = Histogram(
            "roundtrip_batch_size",
            "Requests per engine batch.",
            buckets=sizes,
            registry=self.registry,
        )
        self.batch_compute = Histogram(
            "roundtrip_batch_compute_seconds",
            "Seconds the engine took per batch (compilation included when it happened).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.audit_checks = Counter(
            "roundtrip_audit_checks",
            "Answers re-run through the eager reference by the audit (audit_fraction).",
            registry=self.registry,
        )
        self.audit_mismatches = Counter(
            "roundtrip_audit_mismatches",
            "Audited answers whose bits differed from the eager reference: wrong answers sent.",
            registry=self.registry,
        )
        self.audit_skipped = Counter(
            "roundtrip_audit_skipped",
            "Samples the audit skipped because its queue was full (audit_queue_size).",
            registry=self.registry,
        )
        self.numerics = Gauge(
            "roundtrip_numerics_info",
            "1, labelled with the worker's numerics identity (set once its self-check has "
            "run): workers with the same fingerprint give the same bits.",
            NUMERICS_LABELS,
            registry=self.registry,
        )
        self.unauthenticated = Counter(
            "roundtrip_unauthenticated",
            "Calls refused with UNAUTHENTICATED (missing or wrong bearer token), by method.",
            ["method"],
            registry=self.registry,
        )

    def observe_audit(self, outcome: AuditOutcome) -> None:
        self.audit_checks.inc()
        if not outcome.matched:
            self.audit_mismatches.inc()

    def observe_numerics(self, identity: Mapping[str, str]) -> None:
        self.numerics.labels(**identity).set(1)

    def refused_unauthenticated(self, method: str) -> None:
        self.unauthenticated.labels(method).inc()

    def watch_lanes(self, engines: Mapping[str, Engine]) -> None:
        """Export the lanes' engine counters (by lane name: its device) at scrape time."""
        self.registry.register(_EngineCollector(engines))

    def watch_collector(self, pauses: Pauses) -> None:
        """Export the garbage collector's time and passes by generation at scrape time."""
        self.registry.register(_CollectorPauses(pauses))

    def watch_queue(self, queued: Callable[[], int]) -> None:
        self.queued.set_function(queued)

    def watch_budget(self, budget: ByteBudget) -> None:
        self.admitted_bytes.set_function(lambda: budget.in_use)
        self.computing_bytes.set_function(lambda: budget.computing)
        self.admitted_bytes_peak.set_function(lambda: budget.peak)
        self.admitted_bytes_limit.set(budget.limit)

    def observe_rpcs(self, method: str, codes: Sequence[str], started: float) -> None:
        """The requests of one call that carries many (a batch), each by its code; their
        duration is the call's, from ``started`` (``time.perf_counter()``) until now."""
        seconds = time.perf_counter() - started
        for code, count in collections.Counter(codes).items():
            self.requests.labels(method, code).inc(count)
            self.tally.observe_call(method, code, seconds, count)
        duration = self.duration.labels(method)
        for _ in codes:
            duration.observe(seconds)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.tally.observe_call(method, code, seconds)
        self.duration.labels(method).observe(seconds)

    def observe_batch(self, record: BatchRecord) -> None:
        self.tally.observe_batch(record.size, record.queue_seconds, record.compute_seconds)
        self.batch_size.observe(record.size)
        self.batch_compute.observe(record.compute_seconds)
        for seconds in record.queue_seconds:
            self.queue_wait.observe(seconds)

    def answered_by_code(self) -> dict[str, int]:
        """Requests answered so far by status code, over all RPCs (for the stop log)."""
        counts: dict[str, int] = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    code = sample.labels["code"]
                    counts[code] = counts.get(code, 0) + int(sample.value)
        return counts

    def value(self, sample: str) -> float:
        """One unlabelled sample's current value, e.g. ``roundtrip_inflight_requests``."""
        return self.registry.get_sample_value(sample) or 0.0

    def serve(self, host: str, port: int, *, max_connections: int, timeout_s: float) -> int:
        """Serve ``/metrics`` over HTTP on a daemon thread; returns the bound port.

        prometheus_client's own server spends a thread per connection with no
        timeout, so slow or idle clients could pile threads up without bound.
        This one serves at most ``max_connections`` at once, each for at most
        ``timeout_s`` in all, and closes the one that has held its slot longest
        when a new connection finds them all taken: a scraper always gets in.
        """
        server = make_server(
            host,
            port,
            make_wsgi_app(self.registry),
            server_class=_bounded_server_class(host, max_connections, timeout_s),
            handler_class=_timed_handler_class(timeout_s),
        )
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop serving ``/metrics`` (the last thing a stopping worker does)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def _timed_handler_class(timeout_s: float) -> type[WSGIRequestHandler]:
    # StreamRequestHandler applies ``timeout`` to each connection's socket.
    return type("TimedMetricsHandler", (_QuietHandler,), {"timeout": timeout_s})


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, ``max_connections`` at once, each for at most ``timeout_s``
    in all (however slowly it trickles). When every slot is taken, the connection that has
    held its slot longest is closed to make room, so a scraper is served at once even while
    slow clients hold the others."""

    request_queue_size = 64
    max_connections = 8
    timeout_s = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._open: dict[Any, float] = {}  # socket -> when it must end, oldest first
        self._lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(*args, **kwargs)  # closes itself when it cannot bind: set up first
        self._reaper = threading.Thread(target=self._reap, name="metrics-reaper", daemon=True)
        self._reaper.start()

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with self._lock:
                oldest = next(iter(self._open), None)
            if oldest is not None:
                _shut(oldest)  # its thread ends and gives its slot back
            self._slots.acquire()
        with self._lock:
            self._open[request] = time.monotonic() + self.timeout_s
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._lock:
            held = self._open.pop(request, None) is not None
        if held:
            self._slots.release()

    def _reap(self) -> None:
        """End every connection past its time, a few times a second (one thread for all)."""
        every = min(0.25, self.timeout_s / 4)
        while not self._closed.wait(every):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, ends in self._open.items() if ends <= now]
            for sock in late:
                _shut(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that ended badly (idle past the timeout, reset by its client): one
        JSON log line, not socketserver's traceback on stderr."""
        error = sys.exc_info()[1]
        log.debug(
            "metrics connection ended", extra={"client": client_address, "error": repr(error)}
        )


def _shut(connection: socket.socket) -> None:
    """End a metrics connection now: its thread's next read or write fails."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _bounded_server_class(host: str, max_connections: int, timeout_s: float) -> type[WSGIServer]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return type(
        "BoundedMetricsServer",
        (_BoundedServer,),
        {"max_connections": max_connections, "address_family": family, "timeout_s": timeout_s},
    )
