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
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from roundtrip.server.ops.collectors import (
    Batch,
    Budget,
    CollectorPasses,
    CollectorPauses,
    EngineCollector,
    Lane,
)
from roundtrip.server.ops.metrics_http import MetricsServer
from roundtrip.server.ops.occupancy import Occupancy, OccupancyCollector
from roundtrip.server.ops.tally import InferenceTally

log = logging.getLogger(__name__)


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: The numerics identity's fields that label roundtrip_numerics_info (XLA_FLAGS is free text).
NUMERICS_LABELS = ("backend", "device_kind", "xla_cpu_max_isa", "host_cpu_isa", "fingerprint")

METRIC_NAMES = (
    "roundtrip_requests_total",
    "roundtrip_request_duration_seconds",
    "roundtrip_inflight_requests",
    "roundtrip_inflight_seconds_total",
    "roundtrip_busy_seconds_total",
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
    "roundtrip_batched_programs_total",
    "roundtrip_audit_checks_total",
    "roundtrip_audit_mismatches_total",
    "roundtrip_audit_skipped_total",
    "roundtrip_unauthenticated_total",
    "roundtrip_trace_spans_total",
    "roundtrip_gc_seconds_total",
    "roundtrip_gc_collections_total",
)


class WorkerMetrics:
    """Every metric the worker exports, on one registry."""

    def __init__(self, *, max_batch_size: int) -> None:
        disable_created_metrics()  # the *_created series carry nothing an operator uses here
        self._server: MetricsServer | None = None
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
        self.inflight = Occupancy()
        self.registry.register(OccupancyCollector(self.inflight))
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

        self.trace_spans = Counter(
            "roundtrip_trace_spans",
            "Trace spans by outcome: exported to the OTLP collector, failed (the collector "
            "refused them or could not be reached), or dropped (OTEL_BSP_MAX_QUEUE_SIZE spans "
            "already waited); none while tracing is off.",
            ["outcome"],
            registry=self.registry,
        )

    def count_spans(self, outcome: str, count: int) -> None:
        """``count`` trace spans ended ``outcome`` (exported, failed, dropped): called from
        the exporter's thread."""
        self.trace_spans.labels(outcome).inc(count)

    def observe_audit(self, matched: bool) -> None:
        """One audited answer: ``matched`` False is a wrong answer that went out."""
        self.audit_checks.inc()
        if not matched:
            self.audit_mismatches.inc()

    def observe_numerics(self, identity: Mapping[str, str]) -> None:
        self.numerics.labels(**identity).set(1)

    def refused_unauthenticated(self, method: str) -> None:
        self.unauthenticated.labels(method).inc()

    def watch_lanes(self, engines: Mapping[str, Lane]) -> None:
        """Export the lanes' engine counters (by lane name: its device) at scrape time."""
        self.registry.register(EngineCollector(engines))

    def watch_collector(self, pauses: CollectorPasses) -> None:
        """Export the garbage collector's time and passes by generation at scrape time."""
        self.registry.register(CollectorPauses(pauses))

    def watch_queue(self, queued: Callable[[], int]) -> None:
        self.queued.set_function(queued)

    def watch_budget(self, budget: Budget) -> None:
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

    def observe_batch(self, record: Batch) -> None:
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

    def _value(self, sample: str) -> int:
        return int(self.registry.get_sample_value(sample) or 0)

    @property
    def inflight_requests(self) -> int:
        """Requests admitted and not yet answered, now."""
        return self.inflight.level

    @property
    def audited(self) -> tuple[int, int]:
        """Answers the audit re-ran so far, and how many of them differed."""
        return (
            self._value("roundtrip_audit_checks_total"),
            self._value("roundtrip_audit_mismatches_total"),
        )

    def serve(self, host: str, port: int, *, max_connections: int, timeout_s: float) -> int:
        """Serve ``/metrics`` over HTTP on a daemon thread (:class:`MetricsServer`); returns
        the bound port."""
        self._server = MetricsServer(
            self.registry, host, port, max_connections=max_connections, timeout_s=timeout_s
        )
        return self._server.port

    def close(self) -> None:
        """Stop serving ``/metrics`` (the last thing a stopping worker does)."""
        if self._server is not None:
            self._server.close()
            self._server = None
