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
import threading
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
from roundtrip.client.errors import RoundTripError
from roundtrip.client.messages import build_request
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc
from support.otlp import Collector, Received
from support.polling import wait_for
from support.v2_stub import V2Stub
from support.workers import InProcessWorker, WorkerProcess, free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
X = np.array([1.0, 2.0, 3.0], np.float32)
#: Spans leave the worker's batch processor every 50 ms (5 s by default), so tests wait less.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


#: Calls that arrive within 20 ms of each other share a batch; admitted work is held to
#: 32 MiB, so that one request can be over the budget.
FLAGS = (
    "--log-level",
    "debug",
    "--max-queue-delay-us",
    "20000",
    "--max-inflight-bytes",
    "33554432",
)


def traced_worker(collector: Collector, protocol: str, *flags: str, **env: str) -> InProcessWorker:
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
        worker = InProcessWorker(*flags)
    worker.wait_serving()
    return worker


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@pytest.fixture(scope="module")
def worker(collector: Collector) -> Iterator[InProcessWorker]:
    started = traced_worker(collector, "grpc", *FLAGS)
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


def test_calls_without_context_are_sampled_by_their_trace_id_at_the_configured_ratio() -> None:
    """``parentbased_traceidratio`` at 0.25: about a quarter of 200 calls that come without
    trace context are recorded, each whole (its request and batch spans too), and each by
    the ratio sampler's rule on its new trace id (the id's low 64 bits below a quarter of
    their range), so a service that samples by the same ratio agrees; a caller's sampled
    flag is still followed."""
    with Collector() as collector:
        sampling = traced_worker(
            collector,
            "grpc",
            OTEL_TRACES_SAMPLER="parentbased_traceidratio",
            OTEL_TRACES_SAMPLER_ARG="0.25",
        )
        try:
            with RoundTripClient(sampling.target) as client:
                for seed in range(200):
                    client.round_trip(seed % 4, X, 4)
            new_trace(sampling, collector, 0xAF)  # sampled by its caller, exported last
        finally:
            sampling.kill()
        roots = [
            span
            for span in collector.spans("roundtrip.v1.RoundTripService/RoundTrip")
            if span.trace_id != f"{0xAF:032x}"
        ]
    assert 20 <= len(roots) <= 90, len(roots)  # 50 expected; 5 standard deviations either way
    assert all(not span.parent_id for span in roots)
    assert all(int(span.trace_id, 16) & (2**64 - 1) < 2**62 for span in roots)
    requests = {span.trace_id for span in collector.spans("roundtrip.request")}
    linked = {linked for batch in collector.spans("roundtrip.batch") for linked, _ in batch.links}
    assert {span.trace_id for span in roots} <= requests & linked


def test_a_caller_that_does_not_sample_gets_no_spans(
    worker: InProcessWorker, collector: Collector
) -> None:
    """The caller's sampled flag off (parent-based sampling): no call, request or batch span
    of that trace, and a call after it (sampled) is traced whole."""
    unsampled = "d" * 32
    with RoundTripClient(worker.target) as client:
        client.round_trip(5, X, 4, metadata=[("traceparent", f"00-{unsampled}-{PARENT_ID}-00")])
        client.round_trip_many(
            [(5, X, 4)] * 3, metadata=[("traceparent", f"00-{unsampled}-{PARENT_ID}-00")]
        )
    new_trace(worker, collector, 0xAE)  # exported after anything of the calls before it
    assert not list(collector.trace(unsampled))
    assert not batch_serving(collector, unsampled)


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


@pytest.mark.slow
@pytest.mark.parametrize("collector_is", ["stopped", "stuck", "refusing"])
def test_a_collector_down_stuck_or_refusing_never_fails_a_call_nor_grows(
    collector_is: str,
) -> None:
    """2,000 traced calls against a worker process whose collector's port is closed, whose
    collector takes every export and never answers, or refuses them all: every call is
    answered, the worker's memory stays within 64 MiB of where it was after 200 calls, and
    the spans that could not leave are counted."""
    with (
        Collector(refuse=collector_is == "refusing", stall_s=600) as stuck,
        Collector(refuse=True) as refusing,
    ):
        endpoint, protocol = {
            "stopped": (f"http://127.0.0.1:{free_port()}", "grpc"),
            "stuck": (stuck.grpc_endpoint, "grpc"),
            "refusing": (refusing.http_endpoint, "http/protobuf"),
        }[collector_is]
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
        worker = WorkerProcess(env={**_environ(), **env, **FAST_EXPORT})
        try:
            worker.wait_serving()
            assert calls_answered(worker, 200) == 200
            before = worker.rss_mib()
            assert calls_answered(worker, 1800) == 1800
            grown = worker.rss_mib() - before
            assert grown < 64, f"{grown:.1f} MiB more after 1,800 more calls"
            lost = ("dropped", "failed") if collector_is != "refusing" else ("failed",)
            samples = [f'roundtrip_trace_spans_total{{outcome="{o}"}}' for o in lost]
            wait_for(lambda: sum(worker.metric(s) for s in samples) > 0, "spans counted lost")
            assert worker.metric('roundtrip_trace_spans_total{outcome="exported"}') == 0
        finally:
            assert worker.terminate() == 0  # within the drain: a stuck collector holds nothing


def calls_answered(worker: WorkerProcess, count: int) -> int:
    """Traced RoundTrips from 32 callers at once; how many were answered with eager's bits."""

    async def call_all() -> int:
        async with AsyncRoundTripClient(worker.target, timeout=60) as client:
            gate = asyncio.Semaphore(32)

            async def one(seed: int) -> bool:
                async with gate:
                    traceparent = f"00-{seed + 1:032x}-{PARENT_ID}-01"
                    answer = await client.round_trip(
                        seed % 50, X, 4, metadata=[("traceparent", traceparent)]
                    )
                    return bool(np.array_equal(numbers(answer), reference(seed % 50, X, 4)))

            return sum(await asyncio.gather(*(one(seed) for seed in range(count))))

    return asyncio.run(call_all())


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
    for bad in (
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratoi"},  # the SDK would sample everything
        {"OTEL_TRACES_SAMPLER_ARG": "1%", "OTEL_TRACES_SAMPLER": "traceidratio"},
    ):
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


def test_a_batch_serving_many_traces_is_one_span_linked_to_each(
    worker: InProcessWorker, collector: Collector
) -> None:
    traces = [f"{0xC0FFEE00 + index:032x}" for index in range(4)]

    async def at_once() -> None:
        async with AsyncRoundTripClient(worker.target) as client:
            await asyncio.gather(
                *(
                    client.round_trip(
                        21, X, 4, metadata=[("traceparent", f"00-{trace_id}-{PARENT_ID}-01")]
                    )
                    for trace_id in traces
                )
            )

    asyncio.run(at_once())
    wait_for(lambda: all(batch_serving(collector, t) for t in traces), "the batch spans")
    [batch] = {b.span_id: b for t in traces for b in batch_serving(collector, t)}.values()
    assert sorted(trace_id for trace_id, _ in batch.links) == traces
    assert batch.attributes["roundtrip.batch.size"] == 4


def test_a_request_over_the_byte_budget_carries_its_refusal(
    worker: InProcessWorker, collector: Collector
) -> None:
    trace_id = "a" * 32
    wide = np.zeros((512, 1024), np.float32)  # its working set is over the 32 MiB budget
    traceparent = f"00-{trace_id}-{PARENT_ID}-01"
    with RoundTripClient(worker.target) as client, pytest.raises(RoundTripError) as refused:
        client.round_trip(1, wide, 4096, metadata=[("traceparent", traceparent)])
    code = refused.value.code
    [call] = call_spans(collector, "roundtrip.v1.RoundTripService/RoundTrip", trace_id)
    assert call.status == "ERROR"
    assert call.attributes["rpc.grpc.status_code"] == code.value[0]
    [request] = [s for s in collector.trace(trace_id) if s.name == "roundtrip.request"]
    assert request.status == "ERROR"
    assert "max_inflight_bytes" in request.span.status.message


def test_calls_met_by_a_drain_carry_unavailable(collector: Collector) -> None:
    """A stream open when the drain refuses new calls is ended UNAVAILABLE once answered;
    a call that arrives then is refused UNAVAILABLE; both spans say so. (The drain's second
    step alone, so that the servers stay open for the refused call.)"""
    draining = traced_worker(collector, "grpc", "--drain-grace-s", "10")
    stream_trace, refused_trace = "b" * 32, "c" * 32
    done = threading.Event()

    def messages() -> Iterator[pb.RoundTripStreamRequest]:
        yield pb.RoundTripStreamRequest(id=1, request=build_request(1, X, 4))
        done.wait(30)  # held open: the drain waits on this stream

    try:
        stub = roundtrip_pb2_grpc.RoundTripServiceStub(draining.channel())
        stream = stub.RoundTripStream(
            messages(), metadata=(("traceparent", f"00-{stream_trace}-{PARENT_ID}-01"),)
        )
        assert next(iter(stream)).id == 1
        draining.loop.call_soon_threadsafe(draining.worker.pipeline.calls.refuse_new)
        wait_for(lambda: not draining.worker.pipeline.calls.accepting, "refusing new calls")
        with pytest.raises(grpc.RpcError) as refused:
            stub.RoundTrip(
                build_request(2, X, 4),
                timeout=10,
                metadata=(("traceparent", f"00-{refused_trace}-{PARENT_ID}-01"),),
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as ended:
            list(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        done.set()
        draining.kill()
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]
    for name, trace_id in (("RoundTrip", refused_trace), ("RoundTripStream", stream_trace)):
        [span] = call_spans(collector, f"roundtrip.v1.RoundTripService/{name}", trace_id)
        assert span.status == "ERROR"
        assert span.attributes["rpc.grpc.status_code"] == unavailable
