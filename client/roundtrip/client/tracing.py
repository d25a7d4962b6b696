"""The caller's trace, carried to the worker: where OpenTelemetry is installed (the ``otel``
extra: ``pip install 'roundtrip-worker[otel]'``) and a span is current, every call of the
clients (unary, batch, stream, server info) runs under a CLIENT span of its own, whose W3C
context travels in the call's metadata (``traceparent``, ``tracestate``, ``baggage``: the
globally configured propagators), so the worker's spans join the caller's trace.

Without OpenTelemetry nothing of it is imported and a call pays one test of a constant;
with it but no current span, no span is made (a service that does not trace gets no root
spans from its calls).

>>> with call_span("roundtrip.v1.RoundTripService/RoundTrip") as metadata:
...     metadata  # no span is current here
()
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

#: Whether OpenTelemetry's API is installed (the top-level name only: this imports nothing).
AVAILABLE = importlib.util.find_spec("opentelemetry") is not None


@contextmanager
def call_span(method: str) -> Iterator[tuple[tuple[str, str], ...]]:
    """A CLIENT span named ``method`` (``package.Service/Method``) for the block, child of
    the current span, and the metadata that carries it; ``()`` and no span when no span is
    current or OpenTelemetry is not installed. A call that fails ends it with its status."""
    if not AVAILABLE:
        yield ()
        return
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        yield ()
        return
    service, _, name = method.rpartition("/")
    span = trace.get_tracer("roundtrip.client").start_span(
        method,
        kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    carrier: dict[str, Any] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    try:
        yield tuple(carrier.items())
    except grpc.RpcError as error:
        code_of = getattr(error, "code", None)  # every RpcError grpc raises is also a Call
        code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        raise
    except BaseException as error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        raise
    else:
        span.set_attribute("rpc.grpc.status_code", 0)
    finally:
        span.end()
