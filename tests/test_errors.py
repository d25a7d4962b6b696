"""Bad input gets a clear status naming the field, and never hurts the worker."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from roundtrip.client import InvalidArgumentError, ResourceExhaustedError, RoundTripClient
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.polling import stays
from support.workers import InProcessWorker, WorkerProcess, serving_process, serving_worker

F32 = pb.DTYPE_FLOAT32


def raw_f32(values: list[float]) -> bytes:
    return np.asarray(values, "<f4").tobytes()


INVALID = {
    "features_zero": (pb.RoundTripRequest(x=pb.Array(values=[1, 2, 3]), features=0), "features"),
    "features_negative": (
        pb.RoundTripRequest(x=pb.Array(values=[1, 2, 3]), features=-4),
        "features",
    ),
    "x_missing": (pb.RoundTripRequest(features=4), "x is required"),
    "x_width_zero": (
        pb.RoundTripRequest(x=pb.Array(dtype=F32, shape=[2, 0]), features=4),
        "x.shape[-1]",
    ),
    "x_empty_values": (pb.RoundTripRequest(x=pb.Array(values=[]), features=4), "x"),
    "x_rank_zero": (
        pb.RoundTripRequest(x=pb.Array(dtype=F32, shape=[], raw=raw_f32([1.0])), features=4),
        "rank 0",
    ),
    "x_zero_rows": (
        pb.RoundTripRequest(x=pb.Array(dtype=F32, shape=[0, 3]), features=4),
        "no elements",
    ),
    "raw_too_short": (
        pb.RoundTripRequest(x=pb.Array(dtype=F32, shape=[3], raw=b"\0" * 11), features=4),
        "x.raw",
    ),
    "raw_too_long": (
        pb.RoundTripRequest(x=pb.Array(dtype=F32, shape=[3], raw=b"\0" * 13), features=4),
        "x.raw",
    ),
    "raw_and_values": (
        pb.RoundTripRequest(
            x=pb.Array(dtype=F32, shape=[1], raw=raw_f32([1.0]), values=[1.0]), features=4
        ),
        "not both",
    ),
    "neither_raw_nor_values": (
        pb.RoundTripRequest(x=pb.Array(dtype=F32, shape=[3]), features=4),
        "neither",
    ),
    "values_shape_mismatch": (
        pb.RoundTripRequest(x=pb.Array(shape=[2, 2], values=[1, 2, 3]), features=4),
        "x.values",
    ),
    "negative_dim": (
        pb.RoundTripRequest(x=pb.Array(dtype=F32, shape=[-1, 3], values=[1, 2, 3]), features=4),
        "x.shape",
    ),
    "huge_declared_shape_without_payload": (
        pb.RoundTripRequest(x=pb.Array(dtype=F32, shape=[2**40, 2**20]), features=4),
        "neither",
    ),
    "unknown_dtype": (
        pb.RoundTripRequest(x=pb.Array(dtype=99, values=[1, 2, 3]), features=4),  # type: ignore[arg-type]  # no such dtype
        "x.dtype",
    ),
}

OVER_LIMITS = {
    "features_1e12": (
        pb.RoundTripRequest(x=pb.Array(values=[1, 2, 3]), features=10**12),
        "max_features",
    ),
    "params_too_big": (
        pb.RoundTripRequest(x=pb.Array(values=[1.0] * 60000), features=60000),
        "max_param_bytes",
    ),
}


@pytest.fixture
def stub(worker: WorkerProcess) -> pb_grpc.RoundTripServiceStub:
    return pb_grpc.RoundTripServiceStub(grpc.insecure_channel(worker.target))


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_request_is_invalid_argument_naming_the_field(
    stub: pb_grpc.RoundTripServiceStub, case: str
) -> None:
    request, field = INVALID[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.RoundTrip(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(caught.value.details())


@pytest.mark.parametrize("case", sorted(OVER_LIMITS))
def test_work_beyond_hard_limits_is_invalid_argument_naming_the_limit(
    stub: pb_grpc.RoundTripServiceStub, case: str
) -> None:
    """Over a hard limit a request can never succeed here: a non-retryable code."""
    request, limit = OVER_LIMITS[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.RoundTrip(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert limit in str(caught.value.details())


def test_features_zero_is_invalid_argument_through_the_client(client: RoundTripClient) -> None:
    with pytest.raises(InvalidArgumentError, match="features must be >= 1") as caught:
        client.round_trip(0, [1, 2, 3], 0)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_features_1e12_never_reaches_jax(client: RoundTripClient, worker: WorkerProcess) -> None:
    with pytest.raises(InvalidArgumentError, match="max_features"):
        client.round_trip(0, [1, 2, 3], 10**12)
    assert not any("compute failed" in str(event.get("event")) for event in worker.events)


def test_oversize_message_is_refused_and_says_which_side(worker: WorkerProcess) -> None:
    big = np.zeros(80 * 1024 * 1024 // 4, np.float32)  # 80 MiB > the 64 MiB limit
    with (
        RoundTripClient(worker.target, max_message_bytes=128 * 1024 * 1024) as client,
        pytest.raises(ResourceExhaustedError, match=r"(?i)received message larger than max"),
    ):
        client.round_trip(0, big, 4)


@pytest.fixture(scope="module")
def small_limits() -> Iterator[InProcessWorker]:
    with serving_worker(
        *("--max-x-elements", "100", "--max-output-elements", "60"),
        *("--max-param-bytes", "4000", "--warmup-shapes", "3:4", "--max-batch-size", "2"),
    ) as worker:
        yield worker


@pytest.mark.parametrize(
    ("shape", "features", "limit"),
    [
        ((101,), 1, "max_x_elements"),
        ((20, 5), 4, "max_output_elements"),
        ((9,), 101, "max_param_bytes"),
    ],
)
def test_each_configured_limit_is_enforced(
    small_limits: InProcessWorker, shape: tuple[int, ...], features: int, limit: str
) -> None:
    with RoundTripClient(small_limits.target) as client:
        with pytest.raises(InvalidArgumentError, match=limit):
            client.round_trip(0, np.ones(shape), features)
        assert client.round_trip(0, np.ones((2, 5)), 4).max_abs_diff == 0.0


def test_worker_keeps_serving_exactly_after_bad_requests(
    stub: pb_grpc.RoundTripServiceStub, client: RoundTripClient
) -> None:
    for request, _ in INVALID.values():
        with pytest.raises(grpc.RpcError):
            stub.RoundTrip(request, timeout=30)
    result = client.round_trip(0, [1.0, 2.0, 3.0], 4)
    assert result.as_list() == [-4.221933364868164, -4.221933364868164, 0.0]


@pytest.mark.slow
def test_a_compressed_stream_refused_by_grpc_logs_no_error_and_hurts_nothing() -> None:
    """A message that decompresses past max_message_bytes is refused by gRPC core itself."""
    big = pb.RoundTripStreamRequest(
        id=0, request=pb.RoundTripRequest(x=pb.Array(raw=bytes(4 << 20)), features=4)
    )
    # a process: what is checked is every line the worker writes, grpc's own included
    with serving_process("--warmup-shapes", "3:4", "--max-message-bytes", str(1 << 20)) as w:
        with grpc.insecure_channel(w.target) as channel:
            stub = pb_grpc.RoundTripServiceStub(channel)
            for _ in range(8):  # grpc's late ERROR depends on timing: give it chances
                call = stub.RoundTripStream(
                    iter([big]), timeout=30, compression=grpc.Compression.Gzip
                )
                with pytest.raises(grpc.RpcError) as refused:
                    list(call)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with RoundTripClient(w.target, timeout=30) as client:
            assert client.round_trip(0, [1.0, 2.0, 3.0], 4).max_abs_diff == 0.0

        def errors() -> list[dict[str, object]]:
            return [e for e in w.events if e.get("level") == "ERROR" or "exception" in e]

        assert stays(lambda: not errors(), 0.5), errors()
