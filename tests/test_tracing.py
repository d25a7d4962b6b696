"""Traces: a caller's W3C trace context continues through the worker, on every door, down to
the batch that computed its answer; and tracing never hurts serving.

Spans are received by an OTLP collector on loopback (``support.otlp``: the official OTLP
service definitions) from the worker's official exporters, configured the standard way (the
``OTEL_*`` environment), as a pod would configure them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from reference import numbers, reference

from roundtrip.client import AsyncRoundTripClient, RoundTripClient
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc
from support.otlp import Collector, Received
from support.polling import wait_for
from support.v2_stub import V2Stub
from support.workers import InProcessWorker, WorkerProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
X = np.array([1.0, 2.0, 3.0], np.float32)
#: Spans leave the worker's batch processor every 50 ms (5 s by default), so tests wait less.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


def traced_worker(collector: Collector, protocol: str, **env: str) -> InProcessWorker:
    endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint
    with pytest.MonkeyPatch.context() as patch:  # what the SDK reads when the worker starts
        for name, value in {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": "roundtrip-under-test",
            "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=worker-0,k8s.namespace.name=tests",
            **FAST_EXPORT,
            **env,
        }.items():
            patch.setenv(name, value)
        worker = InProcessWorker("--log-level", "debug")
    worker.wait_serving()
    return worker


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@pytest.fixture(scope="module")
def worker(collector: Collector) -> Iterator[InProcessWorker]:
    started = traced_worker(collector, "grpc")
    try:
        yield started
    finally:
        started.kill()


def call_spans(collector: Collector, name: str, trace_id: str = TRACE_ID) -> list[Received]:
    """The spans called ``name`` in ``trace_id``, once one has arrived."""

    def found() -> list[Received]:
        return [span for span in collector.spans(name) if span.trace_id == trace_id]

    wait_for(lambda: bool(found()), f"a {name} span in trace {trace_id}", 20)
    return found()


def new_trace(worker: InProcessWorker, collector: Collector, seed: int) -> str:
    """A RoundTrip under a new trace id; that id, once its batch span has arrived."""
    trace_id = f"{seed:032x}"
    with RoundTripClient(worker.target) as client:
        client.round_trip(seed, X, 4, metadata=[("traceparent", f"00-{trace_id}-{PARENT_ID}-01")])
    wait_for(lambda: any(batch_serving(collector, trace_id)), "the batch span")
    return trace_id


def batch_serving(collector: Collector, trace_id: str) -> list[Received]:
    """The batch spans linked to a request span of ``trace_id``."""
    return [
        span
        for span in collector.spans("roundtrip.batch")
        if any(linked == trace_id for linked, _ in span.links)
    ]


def test_a_call_continues_the_callers_trace_down_to_its_batch(
    worker: InProcessWorker, collector: Collector
) -> None:
    with RoundTripClient(worker.target) as client:
        answer = client.round_trip(7, X, 4, metadata=[("traceparent", TRACEPARENT)])
        fingerprint = client.server_info().numerics.fingerprint
    assert np.array_equal(numbers(answer), reference(7, X, 4))  # the same bits, traced
    wait_for(lambda: any(batch_serving(collector, TRACE_ID)), "the batch span")
    [call] = call_spans(collector, "roundtrip.v1.RoundTripService/RoundTrip")
    assert call.parent_id == PARENT_ID  # the caller's span's child
    assert call.span.kind == call.span.SPAN_KIND_SERVER
    assert call.status == "OK"
    assert call.attributes["rpc.grpc.status_code"] == 0
    assert call.attributes["rpc.request.size"] > 0
    assert call.attributes["rpc.response.size"] > 0
    assert call.resource["service.name"] == "roundtrip-under-test"
    assert call.resource["k8s.pod.name"] == "worker-0"  # OTEL_RESOURCE_ATTRIBUTES
    [request] = [s for s in collector.trace(TRACE_ID) if s.name == "roundtrip.request"]
    assert request.parent_id == call.span_id
    assert request.attributes["roundtrip.held_bytes"] > 0
    assert request.attributes["roundtrip.queue_wait_seconds"] >= 0
    assert {"queued", "computing"} <= set(request.events)
    [batch] = batch_serving(collector, TRACE_ID)
    assert (TRACE_ID, request.span_id) in batch.links  # the batch links the request...
    assert (batch.trace_id, batch.span_id) in request.links  # ...and the request its batch
    assert batch.trace_id != TRACE_ID
    assert not batch.parent_id
    assert batch.attributes["roundtrip.batch.size"] >= 1
    assert batch.attributes["roundtrip.signature"]
    assert batch.attributes["roundtrip.lane"] == worker.worker.batcher.lanes[0].name
    assert batch.attributes["roundtrip.numerics.fingerprint"] == fingerprint
    for count in ("compilations", "param_cache_hits", "param_cache_misses"):
        assert f"roundtrip.{count}" in batch.attributes


def test_a_batch_span_tells_the_parameter_cache_and_the_executable_cache_apart(
    worker: InProcessWorker, collector: Collector
) -> None:
    """A new shape compiles (in its batch, or on the compile thread before it); a seed seen
    before is served from the parameter cache."""
    x = np.linspace(-1, 1, 200, dtype=np.float32)  # a width no other test of this file uses
    seen: list[Received] = []
    for attempt in range(3):
        trace_id = f"{0xBEEF00 + attempt:032x}"
        with RoundTripClient(worker.target) as client:
            traceparent = f"00-{trace_id}-{PARENT_ID}-01"
            client.round_trip(11, x, 4000, metadata=[("traceparent", traceparent)])
        wait_for(lambda: any(batch_serving(collector, trace_id)), "the batch span")  # noqa: B023
        seen += batch_serving(collector, trace_id)
    assert seen[-1].attributes["roundtrip.compilations"] == 0
    assert seen[-1].attributes["roundtrip.param_cache_hits"] == 1  # the third sight of seed 11
    assert seen[0].attributes["roundtrip.param_cache_hits"] == 0


def test_a_batch_of_many_requests_is_one_call_span_and_a_request_span_each(
    worker: InProcessWorker, collector: Collector
) -> None:
    trace_id = "5" * 32
    requests = [(seed, X, 4) for seed in (1, 2, 3)] + [(4, X, 0)]  # the last is refused
    with RoundTripClient(worker.target) as client:
        outcomes = client.round_trip_many(
            requests, metadata=[("traceparent", f"00-{trace_id}-{PARENT_ID}-01")]
        )
    assert [
        np.array_equal(numbers(o), reference(s, X, 4))
        for o, (s, _, _) in zip(outcomes[:3], requests, strict=False)
    ] == [True] * 3
    [call] = call_spans(collector, "roundtrip.v1.RoundTripService/RoundTripBatch", trace_id)
    wait_for(lambda: len(list(collector.trace(trace_id))) >= 4, "three request spans")
    answered = [s for s in collector.trace(trace_id) if s.name == "roundtrip.request"]
    assert len(answered) == 3
    assert {s.parent_id for s in answered} == {call.span_id}
    assert all(s.status == "OK" for s in answered)
    wait_for(lambda: bool(batch_serving(collector, trace_id)), "the batch span")
    linked = {span_id for b in batch_serving(collector, trace_id) for _, span_id in b.links}
    assert {s.span_id for s in answered} <= linked


def test_a_stream_has_a_span_and_each_message_its_own_under_it(
    worker: InProcessWorker, collector: Collector
) -> None:
    trace_id = "6" * 32
    with RoundTripClient(worker.target) as client:
        answers = list(
            client.stream(
                [(1, X, 4), (2, X, 4)],
                metadata=[("traceparent", f"00-{trace_id}-{PARENT_ID}-01")],
            )
        )
    assert len(answers) == 2
    [stream] = call_spans(collector, "roundtrip.v1.RoundTripService/RoundTripStream", trace_id)
    assert stream.parent_id == PARENT_ID
    wait_for(
        lambda: len([s for s in collector.trace(trace_id) if s.parent_id == stream.span_id]) == 2,
        "two message spans",
    )
    messages = [s for s in collector.trace(trace_id) if s.parent_id == stream.span_id]
    assert {s.name for s in messages} == {"roundtrip.stream.message"}
    assert all(s.status == "OK" for s in messages)
    assert sorted(s.attributes["rpc.message.id"] for s in messages) == [0, 1]


def test_v2_over_grpc_and_rest_continue_the_trace(
    worker: InProcessWorker, collector: Collector
) -> None:
    grpc_trace, rest_trace = "7" * 32, "8" * 32
    request = v2pb.ModelInferRequest(model_name="roundtrip")
    for name, kind, data in (
        ("seed", "INT64", np.asarray([3, 4], "<i8")),
        ("x", "FP32", np.stack([X, X])),
        ("features", "INT64", np.asarray([4], "<i8")),
    ):
        request.inputs.add(name=name, datatype=kind, shape=data.shape)
        request.raw_input_contents.append(data.tobytes())
    with worker.channel() as channel:
        V2Stub(channel).ModelInfer(
            request, timeout=30, metadata=[("traceparent", f"00-{grpc_trace}-{PARENT_ID}-01")]
        )
    [call] = call_spans(collector, "inference.GRPCInferenceService/ModelInfer", grpc_trace)
    assert call.parent_id == PARENT_ID
    assert call.status == "OK"
    body = {
        "inputs": [
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [5]},
            {"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0]},
            {"name": "features", "datatype": "INT64", "shape": [1], "data": [4]},
        ]
    }
    url = f"http://127.0.0.1:{worker.http_port}/v2/models/roundtrip/infer"
    headers = {"traceparent": f"00-{rest_trace}-{PARENT_ID}-01", "tracestate": "vendor=1"}
    post = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(post, timeout=30) as answer:
        assert answer.status == 200
    [rest] = call_spans(collector, "POST /v2/models/{model}/infer", rest_trace)
    assert rest.parent_id == PARENT_ID
    assert rest.span.trace_state == "vendor=1"
    assert rest.attributes["http.response.status_code"] == 200
    assert rest.attributes["http.route"] == "/v2/models/{model}/infer"


def test_no_context_or_malformed_context_starts_a_new_trace_never_an_error(
    worker: InProcessWorker, collector: Collector
) -> None:
    name = "roundtrip.v1.RoundTripService/RoundTrip"
    before = {span.span_id for span in collector.spans(name)}
    with RoundTripClient(worker.target) as client:
        for metadata in (
            [],
            [("traceparent", "00-not-a-trace-context")],
            [("traceparent", "00-" + "0" * 32 + "-" + "0" * 16 + "-01")],
        ):
            assert np.array_equal(
                numbers(client.round_trip(9, X, 4, metadata=metadata)), reference(9, X, 4)
            )
    wait_for(lambda: len(set(s.span_id for s in collector.spans(name)) - before) == 3, "3 spans")
    roots = [span for span in collector.spans(name) if span.span_id not in before]
    assert all(not span.parent_id and span.status == "OK" for span in roots)
    assert len({span.trace_id for span in roots}) == 3


def test_a_refused_call_ends_its_span_with_its_code_and_its_log_lines_carry_the_trace(
    worker: InProcessWorker, collector: Collector
) -> None:
    trace_id = "9" * 32
    stub = roundtrip_pb2_grpc.RoundTripServiceStub(worker.channel())
    bad = pb.RoundTripRequest(seed=1, features=0)
    with pytest.raises(grpc.RpcError) as refused:
        stub.RoundTrip(
            bad, timeout=30, metadata=(("traceparent", f"00-{trace_id}-{PARENT_ID}-01"),)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [call] = call_spans(collector, "roundtrip.v1.RoundTripService/RoundTrip", trace_id)
    assert call.status == "ERROR"
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "refused" in call.events
    logged = [event for event in worker.events if event.get("trace_id") == trace_id]
    assert logged
    assert logged[0]["event"] == "request refused"
    assert logged[0]["span_id"] == call.span_id


def test_probes_scrapes_and_questions_about_the_worker_make_no_spans(
    worker: InProcessWorker, collector: Collector
) -> None:
    new_trace(worker, collector, 0xAB)  # everything before it has been exported
    before = len(collector.spans())
    worker.health()
    worker.scrape()
    with RoundTripClient(worker.target) as client:
        client.server_info(metadata=[("traceparent", TRACEPARENT)])
    with worker.channel() as channel:
        V2Stub(channel).ServerReady(v2pb.ServerReadyRequest(), timeout=30)
    urllib.request.urlopen(f"http://127.0.0.1:{worker.http_port}/v2/health/ready", timeout=30)
    new_trace(worker, collector, 0xAC)  # a call after them, exported after them
    assert {span.name for span in collector.spans()[before:]} == {
        "roundtrip.v1.RoundTripService/RoundTrip",
        "roundtrip.request",
        "roundtrip.batch",
    }


def test_spans_are_counted_by_outcome(worker: InProcessWorker, collector: Collector) -> None:
    new_trace(worker, collector, 0xAD)
    wait_for(
        lambda: worker.metric('roundtrip_trace_spans_total{outcome="exported"}') > 0,
        "spans counted",
    )
    assert worker.metric('roundtrip_trace_spans_total{outcome="dropped"}') == 0


def test_a_collector_that_is_down_or_stuck_never_fails_a_call_nor_grows() -> None:
    """Refusing: every span is counted failed. Stuck (each export takes 30 s): the queue
    of 8 spans fills and the rest are dropped, counted; calls are answered all along."""
    with Collector(refuse=True) as refusing, Collector(stall_s=30) as stuck:
        for collector, protocol, env, outcome in (
            (refusing, "http/protobuf", {}, "failed"),
            (
                stuck,
                "grpc",
                {"OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4"},
                "dropped",
            ),
        ):
            worker = traced_worker(collector, protocol, **env)
            try:
                with RoundTripClient(worker.target) as client:
                    for seed in range(20):
                        answer = client.round_trip(
                            seed, X, 4, metadata=[("traceparent", TRACEPARENT)]
                        )
                        assert np.array_equal(numbers(answer), reference(seed, X, 4))
                sample = f'roundtrip_trace_spans_total{{outcome="{outcome}"}}'
                wait_for(lambda: worker.metric(sample) > 0, sample)  # noqa: B023
            finally:
                assert worker.terminate(timeout=30) == 0  # a stuck collector does not hold it
            assert collector.exports > 0


def test_tracing_is_off_unless_an_endpoint_is_set_and_says_so() -> None:
    worker = InProcessWorker()
    try:
        worker.wait_serving()
        assert worker.worker.pipeline.tracing is None
        assert worker.event("starting")["tracing"] == {"enabled": False}
        with RoundTripClient(worker.target) as client:
            assert not client.server_info().tracing.enabled
    finally:
        worker.kill()


@pytest.mark.slow
def test_the_worker_process_reports_where_spans_go_and_refuses_what_it_cannot_honour() -> None:
    with Collector() as collector:
        env = {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.http_endpoint + "/v1/traces",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.5",
            **FAST_EXPORT,
        }
        worker = WorkerProcess(env={**_environ(), **env})
        try:
            worker.wait_serving()
            settings = {
                "enabled": True,
                "protocol": "http/protobuf",
                "endpoint": collector.http_endpoint + "/v1/traces",
                "sampler": "parentbased_traceidratio",
                "sampler_arg": "0.5",
            }
            assert worker.event("starting")["tracing"] == settings
            with RoundTripClient(worker.target) as client:
                info = client.server_info().tracing
                client.round_trip(1, X, 4, metadata=[("traceparent", TRACEPARENT)])  # sampled
            assert (info.enabled, info.protocol, info.endpoint) == (
                True,
                "http/protobuf",
                settings["endpoint"],
            )
            collector.wait_for("roundtrip.v1.RoundTripService/RoundTrip")
        finally:
            assert worker.terminate() == 0
    for bad in ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, {"OTEL_TRACES_EXPORTER": "zipkin"}):
        done = subprocess.run(
            [sys.executable, "-m", "roundtrip.server", "--port", "0"],
            env={**_environ(), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", **bad},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert next(iter(bad.values())) in done.stderr


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


@pytest.fixture(scope="module")
def caller_spans() -> InMemorySpanExporter:
    """The test process as a traced caller: the global tracer provider (set once per
    process), its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def test_the_clients_carry_the_callers_trace_under_a_client_span(
    worker: InProcessWorker, collector: Collector, caller_spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("a-calling-service")

    async def aio_call() -> None:
        async with AsyncRoundTripClient(worker.target) as client:
            await client.round_trip(2, X, 4)

    for name, call in (
        ("RoundTrip", lambda client: client.round_trip(1, X, 4)),
        ("RoundTripBatch", lambda client: client.round_trip_many([(1, X, 4)])),
        ("RoundTripStream", lambda client: list(client.stream([(1, X, 4)]))),
        ("RoundTrip", None),
    ):
        caller_spans.clear()
        with tracer.start_as_current_span("the caller's work") as work:
            if call is None:
                asyncio.run(aio_call())
            else:
                with RoundTripClient(worker.target) as client:
                    call(client)
        trace_id = trace.format_trace_id(work.get_span_context().trace_id)
        [client_span] = [s for s in caller_spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
        assert client_span.name == f"roundtrip.v1.RoundTripService/{name}"
        assert client_span.parent is not None
        assert client_span.parent.span_id == work.get_span_context().span_id
        [server] = call_spans(collector, client_span.name, trace_id)
        assert server.parent_id == trace.format_span_id(client_span.context.span_id)
    caller_spans.clear()
    with RoundTripClient(worker.target) as client:  # no current span: no client span
        client.round_trip(1, X, 4)
    assert caller_spans.get_finished_spans() == ()
