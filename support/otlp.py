"""An OTLP trace receiver for tests: what a collector receives from the worker's official
OTLP exporters, over gRPC (``opentelemetry.proto.collector.trace.v1.TraceService``) or
HTTP/protobuf (``POST /v1/traces``), on loopback ports, with the spans kept to read.

It can also behave as a collector that is refusing (``UNAVAILABLE`` / HTTP 503) or stuck
(every export waits ``stall_s`` before it is answered), for the tests that show a bad
collector never hurts serving.

>>> with Collector() as collector:
...     collector.grpc_endpoint.startswith("http://127.0.0.1:"), collector.spans()
(True, [])
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as service_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from support.polling import wait_for


@dataclass(frozen=True)
class Received:
    """One span as the collector received it, with its resource's attributes."""

    span: trace_pb2.Span
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return {item.key: value_of(item.value) for item in self.span.attributes}

    @property
    def links(self) -> list[tuple[str, str]]:
        """(trace id, span id) of each span this one links to."""
        return [(link.trace_id.hex(), link.span_id.hex()) for link in self.span.links]

    @property
    def events(self) -> list[str]:
        return [event.name for event in self.span.events]

    @property
    def status(self) -> str:
        """``OK``, ``ERROR`` or ``UNSET``."""
        return trace_pb2.Status.StatusCode.Name(self.span.status.code).removeprefix("STATUS_CODE_")


def value_of(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Collector:
    """The receiver on two free loopback ports (gRPC and HTTP), as a context manager."""

    def __init__(self, *, refuse: bool = False, stall_s: float = 0.0, keep: bool = True) -> None:
        self.refuse = refuse
        self.stall_s = stall_s
        #: Whether spans are kept to read (False: only counted, as a benchmark's collector).
        self.keep = keep
        self.received = 0
        self.exports = 0
        self._closed = threading.Event()  # ends a stuck export's wait
        self._spans: list[Received] = []
        self._lock = threading.Lock()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Service(self), self._grpc
        )
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.http_port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> Collector:
        self._grpc.start()
        self._http_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def receive(self, request: service_pb2.ExportTraceServiceRequest) -> bool:
        """Keep ``request``'s spans; whether the export is accepted."""
        with self._lock:
            self.exports += 1
        if self.stall_s:
            self._closed.wait(self.stall_s)
        with self._lock:
            if self.refuse:
                return False
            if not self.keep:
                self.received += sum(
                    len(scope.spans)
                    for spans in request.resource_spans
                    for scope in spans.scope_spans
                )
                return True
            for resource_spans in request.resource_spans:
                resource = {
                    item.key: value_of(item.value) for item in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    self._spans += [Received(span, resource) for span in scope_spans.spans]
        return True

    def spans(self, name: str | None = None) -> list[Received]:
        with self._lock:
            return [span for span in self._spans if name is None or span.name == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 20.0) -> list[Received]:
        """The spans called ``name``, once ``count`` of them have arrived."""
        wait_for(lambda: len(self.spans(name)) >= count, f"{count} {name} spans", timeout)
        return self.spans(name)

    def trace(self, trace_id: str) -> Iterator[Received]:
        return (span for span in self.spans() if span.trace_id == trace_id)


class _Service(service_grpc.TraceServiceServicer):
    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def Export(  # noqa: N802 (the service's name)
        self, request: service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> service_pb2.ExportTraceServiceResponse:
        if not self._collector.receive(request):
            context.abort(grpc.StatusCode.UNAVAILABLE, "refusing, as told")
        return service_pb2.ExportTraceServiceResponse()


def _handler(collector: Collector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            accepted = self.path == "/v1/traces" and collector.receive(
                service_pb2.ExportTraceServiceRequest.FromString(body)
            )
            reply = service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if accepted else 503)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
