"""The thin client as a library: no JAX, readiness, channels, metadata, deadlines, types."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reference import reference

from roundtrip.client import (
    NO_DEADLINE,
    AsyncRoundTripClient,
    RoundTripClient,
    RoundTripResult,
    StreamOutcome,
    errors,
)
from roundtrip.client.channel import RETRY_POLICY, SERVICE
from roundtrip.client.messages import as_int64, build_request
from roundtrip.client.streams import STREAM_RESUMES, InOrder, resumable
from support.workers import InProcessWorker, WorkerProcess, free_port, serving_worker


@pytest.mark.parametrize(
    ("value", "expected"), [(4, 4), (4.0, 4), (np.int32(7), 7), (-(2**63), -(2**63))]
)
def test_integral_values_are_accepted(value: object, expected: int) -> None:
    assert as_int64("features", value) == expected


@pytest.mark.parametrize("value", [4.5, float("inf"), "4", True, 2**63, None])
def test_non_integral_values_are_value_errors(value: object) -> None:
    with pytest.raises(ValueError, match="features"):
        as_int64("features", value)


def test_requests_default_to_raw_float32() -> None:
    request = build_request(0, [1, 2, 3], 4)
    assert request.x.raw == np.array([1, 2, 3], dtype=np.float32).tobytes()
    assert not request.x.values


def test_errors_keep_their_status_code() -> None:
    error = errors.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert isinstance(error, errors.ResourceExhaustedError)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(error) == "RESOURCE_EXHAUSTED: queue full"
    assert errors.from_rpc_code(3, "x").code == grpc.StatusCode.INVALID_ARGUMENT
    assert type(errors.from_status(grpc.StatusCode.ABORTED, "x")) is errors.RoundTripError


def test_in_order_releases_answers_by_id() -> None:
    order = InOrder[errors.RoundTripError]()
    assert order.push(1, errors.RoundTripError("b")) == []
    released = order.push(0, errors.RoundTripError("a"))
    assert [str(e.message) for e in released] == ["a", "b"]


TOKEN = "per-call-token"


@pytest.fixture(scope="module")
def token_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessWorker]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN)
    with serving_worker("--warmup-shapes", "3:4", "--auth-token-file", str(token_file)) as process:
        yield process


class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]  # grpc-stubs' generic; grpcio's class is not subscriptable at run time
    """Keeps each call's deadline and metadata as the client hands them to gRPC."""

    def __init__(self) -> None:
        self.calls: list[grpc.ClientCallDetails] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.append(details)
        return continuation(details, request)


@pytest.fixture
def recorded(worker: WorkerProcess) -> Iterator[tuple[RoundTripClient, Recorder]]:
    """A client over a channel the caller built, with an interceptor on it."""
    recorder = Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(worker.target), recorder)
    with channel, RoundTripClient(channel=channel, timeout=30.0) as client:
        yield client, recorder


def test_a_caller_brings_its_own_channel_and_interceptors(
    recorded: tuple[RoundTripClient, Recorder],
) -> None:
    client, recorder = recorded
    assert client.round_trip(0, [1.0, 2.0, 3.0], 4).orig_sum == -4.221933364868164
    assert [d.method for d in recorder.calls] == ["/roundtrip.v1.RoundTripService/RoundTrip"]
    client.close()  # the channel is the caller's: still open
    assert client.round_trip(0, [1.0, 2.0, 3.0], 4).orig_sum == -4.221933364868164


def test_per_call_metadata_is_added_to_the_clients(worker: WorkerProcess) -> None:
    recorder = Recorder()
    with (
        grpc.intercept_channel(grpc.insecure_channel(worker.target), recorder) as channel,
        RoundTripClient(channel=channel, metadata=[("x-team", "search")]) as client,
    ):
        client.round_trip(0, [1.0], 1, metadata=[("x-request-id", "42")])
        client.round_trip(0, [1.0], 1)
    first, second = (dict(d.metadata or ()) for d in recorder.calls)
    assert first == {"x-team": "search", "x-request-id": "42"}
    assert second == {"x-team": "search"}


def test_per_call_metadata_reaches_the_worker(token_worker: InProcessWorker) -> None:
    """The worker refuses a call without its token: the token sent per call gets through."""
    with RoundTripClient(token_worker.target) as client:
        with pytest.raises(errors.UnauthenticatedError):
            client.round_trip(0, [1.0, 2.0, 3.0], 4)
        result = client.round_trip(
            0, [1.0, 2.0, 3.0], 4, metadata=[("authorization", f"Bearer {TOKEN}")]
        )
    assert result.orig_sum == -4.221933364868164


def test_a_call_may_drop_its_deadline(recorded: tuple[RoundTripClient, Recorder]) -> None:
    client, recorder = recorded
    client.round_trip(0, [1.0], 1)  # the client's default
    client.round_trip(0, [1.0], 1, timeout=2.5)
    client.round_trip(0, [1.0], 1, timeout=NO_DEADLINE)
    timeouts = [d.timeout for d in recorder.calls]
    assert timeouts[0] == pytest.approx(30.0)
    assert timeouts[1] == pytest.approx(2.5)
    assert timeouts[2] is None


def test_channel_options_replace_the_clients_own(worker: WorkerProcess) -> None:
    """Merged last: a smaller receive limit than the client's 64 MiB default takes effect."""
    small = [("grpc.max_receive_message_length", 1024)]
    with RoundTripClient(worker.target, channel_options=small) as client:
        client.round_trip(0, [1.0, 2.0, 3.0], 4)  # a few floats: fits
        with pytest.raises(errors.ResourceExhaustedError, match="larger than max"):
            client.round_trip(0, np.ones((64, 3), np.float32), 64, return_outputs=True)


def test_channel_and_channel_options_do_not_mix() -> None:
    options = [("grpc.enable_retries", 0)]
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="chan"):
        RoundTripClient(channel=channel, channel_options=options)


@pytest.mark.slow
def test_readiness_follows_the_workers_health() -> None:
    """NOT_SERVING while it warms up (or cannot be reached), then SERVING."""
    process = WorkerProcess("--warmup-shapes", "3:4,64:64,128:128")
    try:
        with RoundTripClient(process.target) as client:
            assert client.is_serving() is False  # warming up: several compilations to go
            client.wait_until_serving(timeout=180)
            assert client.is_serving() is True
            assert process.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.kill()


def test_async_readiness_and_a_missing_worker() -> None:
    async def check(target: str) -> tuple[bool, float]:
        async with AsyncRoundTripClient(target) as client:
            serving = await client.is_serving(timeout=2)
            started = time.monotonic()
            with pytest.raises(errors.DeadlineExceededError, match="SERVING within"):
                await client.wait_until_serving(timeout=1.0)
            return serving, time.monotonic() - started

    serving, waited = asyncio.run(check(f"127.0.0.1:{free_port()}"))
    assert serving is False
    assert 0.9 < waited < 5


def test_async_wait_until_serving_returns_once_serving(worker: WorkerProcess) -> None:
    async def check() -> bool:
        async with AsyncRoundTripClient(worker.target) as client:
            await client.wait_until_serving(timeout=30)
            return await client.is_serving()

    assert asyncio.run(check()) is True


def test_async_stream_takes_an_async_iterable(worker: WorkerProcess) -> None:
    sizes = [3 * (seed % 3 + 1) for seed in range(40)]
    cases = [(seed, np.linspace(-1, 1, n, dtype=np.float32), 4) for seed, n in enumerate(sizes)]

    async def produce() -> AsyncIterator[tuple[int, np.ndarray, int]]:
        for case in cases:
            await asyncio.sleep(0)  # as a queue or a socket would hand them over
            yield case

    async def consume() -> list[StreamOutcome]:
        async with AsyncRoundTripClient(worker.target) as client:
            return [outcome async for outcome in client.stream(produce())]

    outcomes = asyncio.run(consume())
    assert len(outcomes) == len(cases)
    for outcome, case in zip(outcomes, cases, strict=True):
        assert isinstance(outcome, RoundTripResult)
        assert np.array_equal(outcome.as_list(), reference(*case))


def test_the_package_says_its_version_and_ships_its_types() -> None:
    import roundtrip.client
    import roundtrip.v1

    assert roundtrip.client.__version__ == metadata.version("roundtrip-worker")
    for package in (roundtrip.client, roundtrip.v1):
        assert (Path(package.__path__[0]) / "py.typed").is_file()


class Ended(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "the worker is draining", True),
        (grpc.StatusCode.INTERNAL, "Internal error from Core", True),  # grpc.aio's write race
        (grpc.StatusCode.INTERNAL, "internal error: ValueError()", False),  # the worker's own
        (grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid message", False),
    ],
)
def test_a_stream_resumes_only_when_it_was_ended_not_refused(
    code: grpc.StatusCode, details: str, expected: bool
) -> None:
    assert resumable(Ended(code, details), resumes=0) is expected
    assert resumable(Ended(code, details), resumes=STREAM_RESUMES) is False


class _Counting(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Counts the calls a server receives, by method."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.calls[details.method] += 1
        return continuation(details)


def _always_unavailable(request: bytes, context: grpc.ServicerContext) -> NoReturn:
    context.abort(grpc.StatusCode.UNAVAILABLE, "draining (a test server)")


@pytest.fixture
def unavailable_server() -> Iterator[tuple[str, _Counting]]:
    """A server whose RoundTrip always answers UNAVAILABLE and whose health reads SERVING."""
    counting = _Counting()
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[counting])
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"RoundTrip": grpc.unary_unary_rpc_method_handler(_always_unavailable)}
    )
    server.add_generic_rpc_handlers([handler])
    health = grpc_health.HealthServicer()
    health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", counting
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    ("retry_policy", "attempts"),
    [(RETRY_POLICY, 4), ({**RETRY_POLICY, "maxAttempts": 2}, 2), (None, 1)],
)
def test_a_retry_policy_of_ones_own_keeps_load_balancing_and_health_checking(
    unavailable_server: tuple[str, _Counting], retry_policy: Any, attempts: int
) -> None:
    """UNAVAILABLE is tried as often as the policy says (None: once, where a mesh retries),
    and the channel still watches the worker's health (round_robin's health checking)."""
    target, counting = unavailable_server
    client = RoundTripClient(target, timeout=10, retry_policy=retry_policy)
    with client, pytest.raises(errors.UnavailableError):
        client.round_trip(0, [1.0, 2.0, 3.0], 4)
    assert counting.calls[f"/{SERVICE}/RoundTrip"] == attempts
    assert counting.calls["/grpc.health.v1.Health/Watch"] >= 1
