"""Whatever way a call ends, through whichever door, everything it held is given back:
``roundtrip_admitted_bytes`` returns to 0 (the pipeline's calls own their reservations).

Each test holds the worker's compute lane busy (a job on its one thread that waits for an
event), so that a call can be caught while it waits: past its deadline, cancelled by its
caller, cut off by a drain. Then it lets the lane go and reads the budget back.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest

from roundtrip.client.messages import build_request
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.collector import kept_alive, left_for_the_collector
from support.polling import wait_for
from support.v2_stub import V2Stub
from support.workers import InProcessWorker, busy_lane, serving_worker

DOORS = ["unary", "stream", "batch", "v2-grpc", "v2-rest"]
GRPC_DOORS = DOORS[:4]
FLAGS = ("--warmup-shapes", "3:4", "--max-batch-size", "4", "--audit-fraction", "0")
X = np.linspace(-1, 1, 64, dtype=np.float32)


@pytest.fixture(scope="module")
def small_batch_worker() -> Iterator[InProcessWorker]:
    with serving_worker(*FLAGS) as process:
        yield process


def admitted(worker: InProcessWorker) -> float:
    return worker.metric("roundtrip_admitted_bytes")


def settles_to_zero(worker: InProcessWorker, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while admitted(worker) != 0:
        assert time.monotonic() < deadline, f"{admitted(worker)} bytes still admitted"
        time.sleep(0.05)


def v2_request(features: int) -> v2pb.ModelInferRequest:
    request = v2pb.ModelInferRequest(model_name="roundtrip")
    for name, datatype, data in (
        ("seed", "INT64", np.array([7], "<i8")),
        ("x", "FP32", X),
        ("features", "INT64", np.array([features], "<i8")),
    ):
        request.inputs.add(name=name, datatype=datatype, shape=data.shape)
        request.raw_input_contents.append(data.tobytes())
    return request


def v2_json(features: int) -> bytes:
    tensors = [
        {"name": "seed", "datatype": "INT64", "shape": [1], "data": [7]},
        {"name": "x", "datatype": "FP32", "shape": [64], "data": X.tolist()},
        {"name": "features", "datatype": "INT64", "shape": [1], "data": [features]},
    ]
    return json.dumps({"inputs": tensors}).encode()


def grpc_call(channel: grpc.Channel, door: str, features: int, timeout: float) -> Any:
    """Start one call of ``door`` (a future, or a stream's iterator) asking for ``features``."""
    stub = pb_grpc.RoundTripServiceStub(channel)
    request = build_request(7, X, features, return_outputs=True)
    if door == "unary":
        return stub.RoundTrip.future(request, timeout=timeout)
    if door == "batch":
        batch = pb.RoundTripBatchRequest(requests=[request, build_request(8, X, 64)])
        return stub.RoundTripBatch.future(batch, timeout=timeout)
    if door == "stream":
        messages = iter([pb.RoundTripStreamRequest(id=1, request=request)])
        return stub.RoundTripStream(messages, timeout=timeout)
    return V2Stub(channel).ModelInfer.future(v2_request(features), timeout=timeout)


def code_name(number: int) -> str:
    return next(code.name for code in grpc.StatusCode if code.value[0] == number)


def ended(started: Any, door: str) -> str:
    """How a started gRPC call ended: OK, or the code of its error (a stream message's or a
    batch item's own error included)."""
    try:  # a stream's iterator is a future too, whose result() would not read its answers
        result = list(started) if door == "stream" else started.result()
    except grpc.RpcError as error:
        return error.code().name
    except grpc.FutureCancelledError:
        return "CANCELLED"
    if isinstance(result, list):  # a stream of one message: its answer or its own error
        [message] = result
        return "OK" if message.HasField("response") else code_name(message.error.code)
    if isinstance(result, pb.RoundTripBatchResponse):
        errors = [outcome.error.code for outcome in result.outcomes if outcome.HasField("error")]
        return code_name(errors[0]) if errors else "OK"
    return "OK"


def rest_status(worker: InProcessWorker, body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", worker.http_port, timeout=30)
    try:
        connection.request("POST", "/v2/models/roundtrip/infer", body)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(
    ("features", "code", "status"), [(64, "OK", 200), (0, "INVALID_ARGUMENT", 400)]
)
def test_an_answered_or_refused_call_gives_back_what_it_held(
    small_batch_worker: InProcessWorker, door: str, features: int, code: str, status: int
) -> None:
    if door == "v2-rest":
        assert rest_status(small_batch_worker, v2_json(features)) == status
    else:
        with small_batch_worker.channel() as channel:
            assert ended(grpc_call(channel, door, features, timeout=30), door) == code
    settles_to_zero(small_batch_worker)


#: What a call holds: its message as parsed, its claim on the worker, its requests queued
#: (inputs, tickets, reservations), its answers, and a stream's own state.
A_CALLS_OBJECTS = {
    "_OpenStream",
    "_Answer",
    "RoundTripRequest",
    "RoundTripBatchRequest",
    "RoundTripStreamRequest",
    "ModelInferRequest",
    "Received",
    "Unparseable",
    "Call",
    "Many",
    "_Group",
    "Ticket",
    "Reservation",
    "RoundTripInput",
    "RoundTripAnswer",
}


@contextmanager
def nothing_left_for_the_cycle_collector() -> Iterator[None]:
    """The block's calls' objects (:data:`A_CALLS_OBJECTS`) are all freed by reference
    counting: none is among what a collector pass finds unreachable afterwards, and none is
    still alive (kept by what outlives the call: gRPC's state of the call, say)."""
    with kept_alive(A_CALLS_OBJECTS) as kept, left_for_the_collector() as found:
        yield
    assert sorted({type(thing).__name__ for thing in found} & A_CALLS_OBJECTS) == []
    assert sorted({type(thing).__name__ for thing in kept}) == []


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("features", [64, 0])
def test_a_call_leaves_nothing_for_the_cycle_collector(
    small_batch_worker: InProcessWorker, door: str, features: int
) -> None:
    """Answered or refused, a call's objects (its message, its Call, tickets, inputs,
    answers) are freed by reference counting as it ends. In a reference cycle they would
    stay in memory until a collector pass, uncounted by the byte budget (30 refused 32 MiB
    messages held 1 GiB), and those passes would be the event loop's largest cost under
    load (the young generation is collected every 10,000 objects)."""
    with nothing_left_for_the_cycle_collector():
        for _ in range(3):
            if door == "v2-rest":
                rest_status(small_batch_worker, v2_json(features))
            else:
                with small_batch_worker.channel() as channel:
                    ended(grpc_call(channel, door, features, timeout=30), door)
        settles_to_zero(small_batch_worker)


@pytest.mark.parametrize("door", GRPC_DOORS)
@pytest.mark.parametrize("ending", ["DEADLINE_EXCEEDED", "CANCELLED"])
def test_a_call_that_ends_waiting_gives_back_what_it_held(
    small_batch_worker: InProcessWorker, door: str, ending: str
) -> None:
    """Its deadline passes, or its caller cancels it, while it waits behind the busy lane:
    its bytes are given back, and its objects freed as it ends (twice over)."""
    with nothing_left_for_the_cycle_collector():
        for _ in range(2):
            with small_batch_worker.channel() as channel, busy_lane(small_batch_worker) as release:
                timeout = 0.5 if ending == "DEADLINE_EXCEEDED" else 30
                started = grpc_call(channel, door, 64, timeout=timeout)
                if ending == "CANCELLED":
                    wait_for(
                        lambda: admitted(small_batch_worker) > 0
                    )  # admitted: it holds its working set
                    started.cancel()
                assert ended(started, door) == ending
                release.set()
            settles_to_zero(small_batch_worker)


def test_a_rest_caller_that_hangs_up_gives_back_what_it_held(
    small_batch_worker: InProcessWorker,
) -> None:
    with busy_lane(small_batch_worker) as release:
        connection = http.client.HTTPConnection(
            "127.0.0.1", small_batch_worker.http_port, timeout=30
        )
        connection.request("POST", "/v2/models/roundtrip/infer", v2_json(64))
        wait_for(lambda: admitted(small_batch_worker) > 0)
        connection.close()  # gone before its answer
        release.set()
    settles_to_zero(small_batch_worker)


def test_an_unread_stream_gives_back_what_it_held_when_it_ends(
    small_batch_worker: InProcessWorker,
) -> None:
    x = np.linspace(-1, 1, 64 * 256, dtype=np.float32).reshape(64, 256)
    messages = (
        pb.RoundTripStreamRequest(id=i, request=build_request(i, x, 1024, return_outputs=True))
        for i in range(2000)
    )
    with small_batch_worker.channel() as channel:
        stream = pb_grpc.RoundTripServiceStub(channel).RoundTripStream(messages, timeout=120)
        wait_for(lambda: admitted(small_batch_worker) > 20 * 1024 * 1024)  # unwritten answers held
        stream.cancel()
    settles_to_zero(small_batch_worker)


@pytest.mark.parametrize("door", DOORS)
def test_a_call_a_drain_cuts_off_gives_back_what_it_held(door: str) -> None:
    """The drain's grace runs out while the call waits behind the busy lane: the server
    closes, the call is cancelled, and the budget is back to 0 once the worker stopped."""
    worker = InProcessWorker(*FLAGS, "--drain-grace-s", "0.5")
    try:
        worker.wait_serving()
        with worker.channel() as channel, busy_lane(worker) as release:
            if door == "v2-rest":
                connection = http.client.HTTPConnection("127.0.0.1", worker.http_port, timeout=30)
                connection.request("POST", "/v2/models/roundtrip/infer", v2_json(64))
            else:
                started = grpc_call(channel, door, 64, timeout=30)  # (dropped, it is cancelled)
            wait_for(lambda: admitted(worker) > 0)
            threading.Timer(2.0, release.set).start()  # after the grace: lets the batcher drain
            assert worker.terminate() == 1  # the drain cut the call off
            if door != "v2-rest":
                assert ended(started, door) in ("CANCELLED", "UNAVAILABLE")
        assert worker.worker.pipeline.budget.in_use == 0
    finally:
        worker.kill()


def test_a_message_dropped_before_its_parse_leaves_nothing_for_the_cycle_collector() -> None:
    """A message the byte budget cannot take is dropped unparsed: what the parser hands on
    in its stead keeps no exception (whose frames held the message's bytes, for as long as
    gRPC keeps the call: 64 such 16 MiB messages held 2.4 GiB), so the call's objects are
    freed by reference counting as it ends."""
    big = build_request(0, np.ones(200_000, np.float32), 4)  # 800 KB, held twice: over 1 MiB
    flags = ("--warmup-shapes", "3:4", "--max-inflight-bytes", str(1 << 20))
    with serving_worker(*flags) as worker, nothing_left_for_the_cycle_collector():
        for _ in range(3):
            with worker.channel() as channel, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.RoundTripServiceStub(channel).RoundTrip(big, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        settles_to_zero(worker)
