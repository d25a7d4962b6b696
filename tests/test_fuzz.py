"""Property-based fuzzing of every request field, and of the bytes on the wire.

Whatever arrives, each call ends with a documented status (OK,
INVALID_ARGUMENT or RESOURCE_EXHAUSTED; never UNKNOWN or INTERNAL), every OK
answer equals the reference bit for bit, and the worker is still SERVING and
exact afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import ml_dtypes
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reference import reference

from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.workers import WorkerProcess, serving_process

T = TypeVar("T")
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
MAX_MESSAGE_BYTES = 256 * 1024
INT64 = st.integers(-(2**63), 2**63 - 1)
DTYPES: dict[pb.Dtype.ValueType, np.dtype[Any]] = {
    pb.DTYPE_UNSPECIFIED: np.dtype(np.float32),
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_FLOAT64: np.dtype(np.float64),
    pb.DTYPE_FLOAT16: np.dtype(np.float16),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_worker() -> Iterator[WorkerProcess]:
    """Small limits, so oversize work is cheap to ask for."""
    with serving_process(
        "--warmup-shapes",
        "3:4",
        "--max-message-bytes",
        str(MAX_MESSAGE_BYTES),
        "--max-features",
        "4096",
        "--max-x-elements",
        "4096",
        "--max-param-bytes",
        str(4 * 1024 * 1024),
        "--max-output-elements",
        "65536",
    ) as process:
        yield process


@pytest.fixture(scope="module")
def channel(fuzz_worker: WorkerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 8 * MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(fuzz_worker.target, options) as opened:
        yield opened


dims = st.one_of(
    st.integers(0, 5),
    st.integers(-3, -1),
    st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 65504.0, 1e39, -1e300, 5e-324]),
)


@st.composite
def arrays(draw: st.DrawFn) -> pb.Array:
    # any int32: numbers the enum does not declare reach the worker too
    dtype = pb.Dtype.ValueType(
        draw(st.one_of(st.sampled_from(sorted(DTYPES)), st.integers(-(2**31), 2**31 - 1)))
    )
    shape = draw(st.lists(dims, max_size=4))
    array = pb.Array(dtype=dtype, shape=shape)
    declared = math.prod(shape) if shape and all(0 <= d <= 64 for d in shape) else 3
    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 4
    payload = draw(st.sampled_from(["raw", "raw_off_by_one", "values", "both", "neither"]))
    if payload in ("raw", "both"):
        array.raw = draw(st.binary(min_size=declared * itemsize, max_size=declared * itemsize))
    if payload == "raw_off_by_one":
        length = max(declared * itemsize + draw(st.sampled_from([-1, 1])), 0)
        array.raw = draw(st.binary(min_size=length, max_size=length))
    if payload in ("values", "both"):
        array.values.extend(draw(st.lists(floats, min_size=0, max_size=max(declared, 1) + 1)))
    return array


@st.composite
def well_formed_arrays(draw: st.DrawFn) -> pb.Array:
    """Arrays the contract accepts: any bytes or values, so NaN, Inf and subnormals too."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    count = math.prod(shape)
    if draw(st.booleans()):
        size = count * DTYPES[dtype].itemsize
        return pb.Array(dtype=dtype, shape=shape, raw=draw(st.binary(min_size=size, max_size=size)))
    values = draw(st.lists(floats, min_size=count, max_size=count))
    return pb.Array(dtype=dtype, shape=shape if len(shape) > 1 else [], values=values)


@st.composite
def requests(draw: st.DrawFn) -> pb.RoundTripRequest:
    """Half well-formed (exactness is checked on them), half anything at all."""
    well_formed = draw(st.booleans())
    request = pb.RoundTripRequest(
        seed=draw(INT64),
        features=draw(st.integers(1, 70) if well_formed else st.one_of(st.integers(-2, 70), INT64)),
        return_outputs=draw(st.booleans()),
    )
    if well_formed:
        request.x.CopyFrom(draw(well_formed_arrays()))
    elif draw(st.sampled_from([True] * 9 + [False])):  # x missing one time in ten
        request.x.CopyFrom(draw(arrays()))
    return request


def outcome(call: Callable[[], T]) -> tuple[grpc.StatusCode, str, T | None]:
    """The call's status code, details and answer (None unless OK)."""
    try:
        return grpc.StatusCode.OK, "", call()
    except grpc.RpcError as error:
        return error.code(), str(error.details()), None


def decode_x(array: pb.Array) -> np.ndarray[Any, Any]:
    """x as the contract reads it, decoded here independently of the worker's codec."""
    dtype = DTYPES[array.dtype]
    if array.raw:
        return np.frombuffer(array.raw, dtype.newbyteorder("<")).reshape(tuple(array.shape))
    values = np.asarray(list(array.values), dtype)
    return values.reshape(tuple(array.shape)) if array.shape else values


def same_bits(got: pb.RoundTripResponse, expected: np.ndarray[Any, Any]) -> bool:
    answered = np.array([got.orig_sum, got.merged_sum, got.max_abs_diff])
    both_nan = np.isnan(answered) & np.isnan(expected)
    return bool(np.all(both_nan | (answered.view(np.int64) == expected.view(np.int64))))


def still_serving_and_exact(worker: WorkerProcess, channel: grpc.Channel) -> None:
    assert worker.process.poll() is None
    assert worker.health() == health_pb2.HealthCheckResponse.SERVING
    request = pb.RoundTripRequest(seed=0, x=pb.Array(values=[1.0, 2.0, 3.0]), features=4)
    answer = pb_grpc.RoundTripServiceStub(channel).RoundTrip(request, timeout=30)
    assert same_bits(answer, reference(0, np.array([1.0, 2.0, 3.0], np.float32), 4))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 as f32
def test_any_request_gets_a_documented_status_and_ok_answers_are_exact(
    fuzz_worker: WorkerProcess, channel: grpc.Channel
) -> None:
    stub = pb_grpc.RoundTripServiceStub(channel)

    @FUZZ
    @given(request=requests())
    def one(request: pb.RoundTripRequest) -> None:
        code, details, answer = outcome(lambda: stub.RoundTrip(request, timeout=60))
        event(code.name)
        assert code in DOCUMENTED, (code, details)
        if answer is None:
            assert details  # a message the caller can act on
            return
        expected = reference(request.seed, decode_x(request.x), request.features)
        assert same_bits(answer, expected), (answer, expected)

    one()
    still_serving_and_exact(fuzz_worker, channel)


def test_garbage_bytes_on_the_wire_are_invalid_argument(
    fuzz_worker: WorkerProcess, channel: grpc.Channel
) -> None:
    methods = [
        channel.unary_unary("/roundtrip.v1.RoundTripService/RoundTrip", None, None),
        channel.unary_unary("/roundtrip.v1.RoundTripService/GetServerInfo", None, None),
    ]
    stream = channel.stream_stream("/roundtrip.v1.RoundTripService/RoundTripStream", None, None)

    @FUZZ
    @given(body=st.binary(max_size=64), method=st.sampled_from(methods))
    def one(body: bytes, method: grpc.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
        code, details, _ = outcome(lambda: method(body, timeout=30))
        event(code.name)
        assert code in DOCUMENTED, (code, details)

    one()
    with pytest.raises(grpc.RpcError) as refused:
        list(stream(iter([b"\xff\xff\xff"]), timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid roundtrip.v1.RoundTripStreamRequest" in str(refused.value.details())
    still_serving_and_exact(fuzz_worker, channel)


def test_an_oversize_message_is_resource_exhausted(
    fuzz_worker: WorkerProcess, channel: grpc.Channel
) -> None:
    request = pb.RoundTripRequest(
        x=pb.Array(dtype=pb.DTYPE_FLOAT32, shape=[MAX_MESSAGE_BYTES // 4 + 1]), features=4
    )
    request.x.raw = bytes(4 * (MAX_MESSAGE_BYTES // 4 + 1))
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.RoundTripServiceStub(channel).RoundTrip(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving_and_exact(fuzz_worker, channel)
