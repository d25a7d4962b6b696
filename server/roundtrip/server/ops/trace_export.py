"""Where the worker's spans go: the OpenTelemetry SDK's tracer provider for
:class:`~roundtrip.server.ops.tracing.TraceSettings`, with the official OTLP exporter behind a
bounded queue (:class:`BoundedExport`). Imported only when tracing is on (the SDK takes
about 170 ms to import)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace

from roundtrip.server.ops.tracing import TraceSettings

#: Spans that may wait to be exported, unless OTEL_BSP_MAX_QUEUE_SIZE says otherwise (the
#: SDK's default).
DEFAULT_MAX_QUEUE_SIZE = 2048


class CountedExporter:
    """An exporter that tells ``done(spans, exported)`` once each export has returned (or
    raised): how :class:`BoundedExport` knows what still waits, and what the metric counts."""

    def __init__(self, inner: Any, done: Callable[[int, bool], None]) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self._inner = inner
        self._done = done
        self._success = SpanExportResult.SUCCESS

    def export(self, spans: Sequence[Any]) -> Any:
        result = None
        try:
            result = self._inner.export(spans)
        finally:
            self._done(len(spans), result == self._success)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


class BoundedExport:
    """The span processor: the SDK's ``BatchSpanProcessor`` (its own thread exports), behind
    a bound that never blocks and never grows. A span that ends while ``max_queue_size``
    spans wait (queued, or in an export a slow collector holds) is dropped here, counted,
    and never reaches the SDK's queue (whose own drop logs a warning per span). Every span
    is counted by its outcome: ``exported``, ``failed`` (the collector refused or was
    unreachable once the exporter gave up) or ``dropped``.
    """

    def __init__(
        self, exporter: Any, *, count: Callable[[str, int], None], max_queue_size: int
    ) -> None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._count = count
        self._lock = threading.Lock()
        self._pending = 0
        self.max_queue_size = max_queue_size
        counted = CountedExporter(exporter, self._exported)
        self._inner = BatchSpanProcessor(counted, max_queue_size=max_queue_size)  # type: ignore[arg-type]

    def _exported(self, spans: int, succeeded: bool) -> None:
        with self._lock:
            self._pending -= spans
        self._count("exported" if succeeded else "failed", spans)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: Any) -> None:
        with self._lock:
            if self._pending >= self.max_queue_size:
                dropped = True
            else:
                self._pending += 1
                dropped = False
        if dropped:
            self._count("dropped", 1)
            return
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))

    def _on_ending(self, span: Any) -> None:  # the SDK >= 1.38 asks every processor
        pass


class RootIds:
    """The tracer's trace ids (the SDK's random ones), with a root's drawn ahead of its span:
    :meth:`recorded_root` tells whether the sampler records a call that came without trace
    context before anything of its span is made, and keeps the id for the span that follows
    in the same thread. The SDK's ``start_span`` for a call it does not record costs about
    40 Python calls (ids, a sampling result, a non-recording span); at 1% sampling that is
    the whole cost of tracing an unrecorded call, and this makes it one random draw.

    The decision is the sampler's own rule on the same id (a ratio sampler records a trace
    whose id's low 64 bits are below ``rate`` of their range), so a recorded root's trace id
    shows the sampler's decision to any service that samples by the same ratio.

    >>> ids = RootIds(0.5)
    >>> from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    >>> rule = TraceIdRatioBased(0.5)
    >>> draws = [(ids.recorded_root(), ids.generate_trace_id()) for _ in range(400)]
    >>> all(rule.should_sample(None, tid, "c").decision.is_sampled() for recorded, tid in draws
    ...     if recorded)
    True
    >>> 120 < sum(recorded for recorded, _ in draws) < 280
    True
    """

    def __init__(self, rate: float) -> None:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

        self._ids = RandomIdGenerator()
        self.generate_span_id = self._ids.generate_span_id
        self.is_trace_id_random = self._ids.is_trace_id_random
        self._bound = TraceIdRatioBased.get_bound_for_rate(rate)
        self._limit = TraceIdRatioBased.TRACE_ID_LIMIT
        self._ahead = threading.local()

    def recorded_root(self) -> bool:
        """Whether the sampler records a new root; if so, its trace id is the next one this
        thread's :meth:`generate_trace_id` gives."""
        if not self._bound:
            return False
        trace_id = self._ids.generate_trace_id()
        if trace_id & self._limit >= self._bound:
            return False
        self._ahead.trace_id = trace_id
        return True

    def generate_trace_id(self) -> int:
        ahead: int | None = getattr(self._ahead, "trace_id", None)
        if ahead is None:
            return self._ids.generate_trace_id()
        self._ahead.trace_id = None
        return ahead


def sampler_for(settings: TraceSettings) -> Any:
    """The SDK's sampler that ``OTEL_TRACES_SAMPLER``/``_ARG`` name (checked by
    :class:`TraceSettings`), built from the share of roots it records so that its rate is
    the one :class:`RootIds` decides by.

    >>> sampler_for(TraceSettings(True, sampler="parentbased_traceidratio", root_rate=0.25)
    ...             ).get_description()
    'ParentBased{root:TraceIdRatioBased{0.25},remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler}'
    >>> sampler_for(TraceSettings(True, sampler="always_off", root_rate=0.0)).get_description()
    'AlwaysOffSampler'
    """
    from opentelemetry.sdk.trace import sampling

    name, rate = settings.sampler, settings.root_rate
    if name.endswith("traceidratio"):
        root: Any = sampling.TraceIdRatioBased(rate)
    else:
        root = sampling.ALWAYS_ON if rate else sampling.ALWAYS_OFF
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def start(
    settings: TraceSettings, *, version: str, count: Callable[[str, int], None]
) -> tuple[trace.Tracer, trace.Tracer, Callable[[float], None], Callable[[], bool]] | None:
    """For ``settings`` (None when tracing is off): the tracer of calls and requests
    (sampled as ``OTEL_TRACES_SAMPLER`` says), the tracer of batches (always recorded: a
    batch span is only made for a batch that served a recorded request, whose sampling
    decision it follows), how to close both within a time (they share one exporter), and
    whether the sampler records the next call without trace context
    (:meth:`RootIds.recorded_root`)."""
    if not settings.enabled:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    where = resource(version)
    ids = RootIds(settings.root_rate)
    provider = TracerProvider(
        resource=where,
        shutdown_on_exit=False,
        sampler=sampler_for(settings),
        id_generator=ids,  # type: ignore[arg-type]
    )
    batches = TracerProvider(resource=where, shutdown_on_exit=False, sampler=ALWAYS_ON)
    queue = int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") or DEFAULT_MAX_QUEUE_SIZE)
    processor = BoundedExport(OTLPSpanExporter(), count=count, max_queue_size=queue)
    provider.add_span_processor(processor)  # type: ignore[arg-type]
    batches.add_span_processor(processor)  # type: ignore[arg-type]

    def flush_and_shut_down(timeout_s: float) -> None:
        processor.force_flush(int(timeout_s * 1000))
        provider.shutdown()

    def close(timeout_s: float) -> None:
        # in a thread of its own: an export to a collector that is down holds it for the
        # exporter's timeout, and the worker's drain must not wait for that
        done = threading.Thread(target=flush_and_shut_down, args=(timeout_s,), daemon=True)
        done.start()
        done.join(timeout_s)

    return (
        provider.get_tracer("roundtrip.server", version),
        batches.get_tracer("roundtrip.server", version),
        close,
        ids.recorded_root,
    )


def resource(version: str) -> Any:
    """What every span says of where it came from: ``OTEL_RESOURCE_ATTRIBUTES`` (the pod,
    namespace and node, as the manifests pass them from the downward API) and
    ``OTEL_SERVICE_NAME`` (else ``roundtrip-worker``), with the worker's version."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

    detected = Resource.create({})
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        detected = detected.merge(Resource({SERVICE_NAME: "roundtrip-worker"}))
    return Resource({SERVICE_VERSION: version}).merge(detected)
