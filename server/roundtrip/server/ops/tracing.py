"""Traces: a caller's W3C trace context continued through the worker, the standard way.

Tracing is on exactly when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``OTEL_SDK_DISABLED`` is not ``true`` (as
KServe does); everything else is the OpenTelemetry SDK reading its own ``OTEL_*``
variables: the sampler (``OTEL_TRACES_SAMPLER``/``_ARG``, parent-based always-on by
default), the resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), the
exporter's endpoint, headers, timeout and TLS, the batch processor's queue
(``OTEL_BSP_*``). ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (or ``OTEL_EXPORTER_OTLP_PROTOCOL``)
picks the official OTLP exporter: ``http/protobuf`` (the specification's default) or
``grpc``.

Off, nothing here runs on a request's path: the pipeline holds ``None`` for its tracing.
On, spans leave through :class:`~roundtrip.server.ops.trace_export.BoundedExport`, which
never blocks the event loop and never grows: once ``OTEL_BSP_MAX_QUEUE_SIZE`` spans wait
for a collector that is down or slow, new ones are dropped and counted
(``roundtrip_trace_spans_total{outcome="dropped"}``).

>>> settings = TraceSettings.from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
>>> settings.enabled, settings.protocol, settings.endpoint
(True, 'http/protobuf', 'http://c:4318')
>>> TraceSettings.from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
...                             "OTEL_SDK_DISABLED": "true"}).enabled
False
>>> TraceSettings.from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
...                             "OTEL_TRACES_EXPORTER": "none"}).enabled
False
>>> TraceSettings.from_environ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317",
...                             "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}).protocol
'grpc'
>>> TraceSettings.from_environ({}).describe()
{'enabled': False}

A sampler the specification does not name, or a ratio that is not a share, is refused
(the SDK would sample everything); ``root_rate``: the share of calls without context it records.

>>> on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
>>> TraceSettings.from_environ({**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}).root_rate
0.01
>>> try:
...     TraceSettings.from_environ({**on, "OTEL_TRACES_SAMPLER": "traceidratio",
...                                 "OTEL_TRACES_SAMPLER_ARG": "1%"})
... except TraceConfigError as refused:
...     print(refused)
OTEL_TRACES_SAMPLER_ARG='1%': a share from 0 to 1 (0.01 samples 1% of the calls)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

#: The metadata keys (and HTTP headers) trace context arrives in: W3C trace context and
#: baggage, what the default propagators read.
CONTEXT_KEYS = ("traceparent", "tracestate", "baggage")

PROTOCOLS = ("http/protobuf", "grpc")

#: ``OTEL_TRACES_SAMPLER``'s values, by the share of calls without context each records.
SAMPLERS: dict[str, float | None] = {
    "parentbased_always_on": 1.0,
    "parentbased_always_off": 0.0,
    "parentbased_traceidratio": None,
    "always_on": 1.0,
    "always_off": 0.0,
    "traceidratio": None,
}

#: The context of a call that came without one: its span is a new root.
_NO_PARENT = otel_context.Context()


class Batch(Protocol):
    """What a traced batch's span says of it (the batcher's ``BatchRecord``)."""

    @property
    def signature(self) -> object: ...
    @property
    def size(self) -> int: ...
    @property
    def lane(self) -> str: ...
    @property
    def queue_seconds(self) -> Sequence[float]: ...
    @property
    def compute_seconds(self) -> float: ...


class TraceConfigError(ValueError):
    """``OTEL_*`` settings the worker cannot honour (the worker refuses to start)."""


@dataclass(frozen=True)
class TraceSettings:
    """What the ``OTEL_*`` environment says about traces, as the worker reports it (its
    start log, GetServerInfo)."""

    enabled: bool
    protocol: str = ""
    endpoint: str = ""
    sampler: str = ""
    sampler_arg: str = ""
    #: The share of calls that come without trace context the sampler records.
    root_rate: float = 0.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TraceSettings:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT", ""
        )
        disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
        if not endpoint or disabled or exporter == "none":
            return cls(enabled=False)
        if exporter != "otlp":
            raise TraceConfigError(
                f"OTEL_TRACES_EXPORTER={exporter!r}: this worker exports traces over OTLP only "
                "('otlp', or 'none' for no traces)"
            )
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol not in PROTOCOLS:
            raise TraceConfigError(
                f"OTLP protocol {protocol!r} (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or "
                f"OTEL_EXPORTER_OTLP_PROTOCOL): use one of {', '.join(PROTOCOLS)}"
            )
        sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        if sampler not in SAMPLERS:
            raise TraceConfigError(
                f"OTEL_TRACES_SAMPLER={sampler!r}: use one of {', '.join(SAMPLERS)}"
            )
        sampler_arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "")
        rate = SAMPLERS[sampler]
        if rate is None:
            rate = _share(sampler_arg)
        return cls(
            enabled=True,
            protocol=protocol,
            endpoint=endpoint,
            sampler=sampler,
            sampler_arg=sampler_arg,
            root_rate=rate,
        )

    def describe(self) -> dict[str, Any]:
        """The settings as the start log prints them."""
        if not self.enabled:
            return {"enabled": False}
        return {
            "enabled": True,
            "protocol": self.protocol,
            "endpoint": self.endpoint,
            "sampler": self.sampler,
            "sampler_arg": self.sampler_arg,
        }


def _share(text: str) -> float:
    """A ratio sampler's argument: a share from 0 to 1 (1 when unset, as the spec says)."""
    if not text.strip():
        return 1.0
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise TraceConfigError(
            f"OTEL_TRACES_SAMPLER_ARG={text!r}: a share from 0 to 1 (0.01 samples 1% of the calls)"
        )
    return share


def carrier_of(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The trace context among a call's gRPC metadata (its keys are lowercase: HTTP/2's
    rule, which gRPC enforces), as text. It runs on every call while tracing is on.

    >>> carrier_of([("traceparent", "00-ab-cd-01"), ("x-other", "1"), ("bin-bin", b"2")])
    {'traceparent': '00-ab-cd-01'}
    """
    return {key: value for key, value in pairs if key in _CONTEXT_KEYS and isinstance(value, str)}


_CONTEXT_KEYS = frozenset(CONTEXT_KEYS)


@functools.cache
def _rpc_attributes(service: str, method: str) -> tuple[str, dict[str, Any]]:
    """A gRPC method's span name and fixed attributes, built once (never mutated)."""
    return f"{service}/{method}", {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
    }


@dataclass(frozen=True, slots=True)
class TraceStart:
    """How a door's call starts its span: its name, the trace context it came with (None:
    the current span's child, a stream message's), and its first attributes (the
    OpenTelemetry conventions for RPC and HTTP servers).

    >>> TraceStart.rpc("roundtrip.v1.RoundTripService", "RoundTrip", [], 10).name
    'roundtrip.v1.RoundTripService/RoundTrip'
    """

    name: str
    carrier: Mapping[str, str] | None
    attributes: Mapping[str, Any]
    #: More attributes, this call's own (set beside ``attributes``, which may be shared).
    more: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def rpc(
        cls,
        service: str,
        method: str,
        metadata: Iterable[tuple[str, Any]] | None,
        request_bytes: int = 0,
    ) -> TraceStart:
        """A gRPC call's, with the trace context among its ``metadata``."""
        name, attributes = _rpc_attributes(service, method)
        carrier = None if metadata is None else carrier_of(metadata)
        return cls(name, carrier, attributes, (("rpc.request.size", request_bytes),))

    @classmethod
    def message(cls, service: str, method: str, message_id: int, request_bytes: int) -> TraceStart:
        """A stream message's, the child of its stream's span (the current one)."""
        more = (("rpc.request.size", request_bytes), ("rpc.message.id", message_id))
        return cls("roundtrip.stream.message", None, _rpc_attributes(service, method)[1], more)

    @classmethod
    def http(cls, method: str, route: str, headers: Mapping[str, str]) -> TraceStart:
        """An HTTP request's, named by its route (its template, not its path)."""
        return cls(
            f"{method} {route}",
            {key: headers[key] for key in CONTEXT_KEYS if key in headers},  # any case
            {"http.request.method": method, "http.route": route},
        )


def outcome_status(code: str) -> Status:
    """A span's status for a call (or request) that ended with gRPC ``code`` (its name)."""
    if code == "OK":
        return Status(StatusCode.OK)
    return Status(StatusCode.ERROR, code)


class Tracing:
    """The worker's tracer, and how the pipeline's pieces open and end their spans.

    * a **call** (one per RPC, one per stream message under its stream's): a SERVER span,
      the child of the caller's span (from its ``traceparent``) or a new root;
    * a **request** inside a call: a span from its admission to its answer (queue wait and
      compute as events), linked to the batch that computed it;
    * a **batch**: a span of its own, linked to every request it served (the OpenTelemetry
      convention for batch processing), with the lane, signature, caches and numerics
      fingerprint as attributes.
    """

    def __init__(
        self,
        tracer: trace.Tracer,
        settings: TraceSettings,
        *,
        batch_tracer: trace.Tracer | None = None,
        fingerprint: Callable[[], str] = str,
        root: Callable[[], bool],
        close: Callable[[float], None] | None = None,
    ) -> None:
        self.tracer = tracer
        #: Whether the sampler records a call that came without trace context, asked
        #: before its span starts (its trace id drawn ahead, for that span): an unrecorded
        #: call, most of them at a low rate, then starts no span at all.
        self._root = root
        #: Batches' spans: recorded whenever made (only for a batch that served a recorded
        #: request, whose sampling decision they follow).
        self.batch_tracer = batch_tracer or tracer
        self.settings = settings
        #: The numerics fingerprint batch spans carry (set once the self-check has run).
        self.fingerprint = fingerprint
        self._close = close

    def start_call(self, start: TraceStart) -> tuple[Span, object] | None:
        """A call's span, started and made current (its token: for :meth:`end_call`);
        None when the sampler does not record it (nothing more of the call is traced).
        ``carrier``: the call's trace context (None: the current span's child, a stream
        message's, and None when that is not recorded); malformed context is ignored (a
        new root)."""
        carrier = start.carrier
        if carrier is None:
            if not trace.get_current_span().is_recording():
                return None
            parent = None
        elif carrier:
            parent = propagate.extract(carrier)
        else:  # no context: a new root, if the sampler records it
            if not self._root():
                return None
            parent = _NO_PARENT
        span = self.tracer.start_span(start.name, context=parent, kind=SpanKind.SERVER)
        if not span.is_recording():  # unsampled: its attributes are never set
            return None
        span.set_attributes(start.attributes)
        for key, value in start.more:
            span.set_attribute(key, value)
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    @staticmethod
    def end_call(span: Span, token: object, code: str, message: str = "") -> None:
        """End a call's span with the gRPC code it ended with (and the current context
        restored)."""
        otel_context.detach(token)  # type: ignore[arg-type]
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        if code != "OK" and message:
            span.add_event("refused", {"code": code, "message": message})
        span.set_status(outcome_status(code))
        span.end()

    def start_request(
        self, parent: otel_context.Context, attributes: Mapping[str, Any]
    ) -> Span | None:
        """A request's span, from its admission (its bytes reserved) to its answer; None
        when its call is not recorded."""
        if not parent or not trace.get_current_span(parent).is_recording():
            return None  # (an empty context, an unrecorded call's, holds no span)
        return self.tracer.start_span("roundtrip.request", context=parent, attributes=attributes)

    def record_batch(
        self,
        batch: Batch,
        spans: Sequence[Span | None],
        *,
        started_ns: int,
        counts: Mapping[str, int],
    ) -> None:
        """One computed ``batch`` whose requests' ``spans`` (in its order; None: not traced)
        it served: its span, in a trace of its own and linked to each request's (the
        OpenTelemetry convention for batch processing), with ``counts`` (what the engine's
        caches did) among its attributes; and on each request's span its queue wait, an
        event when the compute started and a link back."""
        traced = [
            (span, queued_s)
            for span, queued_s in zip(spans, batch.queue_seconds, strict=True)
            if span is not None
        ]
        span = self.batch_tracer.start_span(
            "roundtrip.batch",
            context=otel_context.Context(),  # a root: it serves many traces
            links=[Link(span.get_span_context()) for span, _ in traced],
            start_time=started_ns,
            attributes={
                "roundtrip.batch.size": batch.size,
                "roundtrip.lane": batch.lane,
                "roundtrip.signature": str(batch.signature),
                "roundtrip.numerics.fingerprint": self.fingerprint(),
                **counts,
            },
        )
        span.end(end_time=started_ns + int(batch.compute_seconds * 1e9))
        back = span.get_span_context()
        for request, queued_s in traced:
            request.set_attribute("roundtrip.queue_wait_seconds", queued_s)
            request.add_event("computing", timestamp=started_ns)
            request.add_link(back)

    def close(self, timeout_s: float) -> None:
        """Send what is queued, for at most ``timeout_s`` (a collector that is down never
        holds a draining worker longer)."""
        if self._close is not None:
            self._close(timeout_s)


def end_request(span: Span | None, failure: str | None) -> None:
    """End a request's span (None: tracing is off): answered (``failure`` None) or with its
    own refusal."""
    if span is None:
        return
    span.set_status(Status(StatusCode.OK) if failure is None else Status(StatusCode.ERROR, failure))
    span.end()


def queued(span: Span | None, item: Any) -> Span | None:
    """A request's span once it is queued (None: tracing is off), for its ticket."""
    if span is not None:
        span.add_event("queued", {"roundtrip.signature": str(item.signature)})
    return span
