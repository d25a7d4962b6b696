"""The byte budget is a hard bound, held for a bounded time, and shared out by caller.

Each test is an attack measured against a real worker (a process, unless the test needs
the worker's own objects): the batcher
never wedges while health says SERVING, ``roundtrip_admitted_bytes`` never exceeds
``max_inflight_bytes``, and one caller (a stream that does not read, a few dozen trickling
uploads) cannot make every other caller fail.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from callers import Sampler, in_threads, post
from grpc_health.v1 import health_pb2
from reference import reference

from roundtrip.client import RoundTripClient
from roundtrip.client.channel import channel_options
from roundtrip.client.messages import build_request
from roundtrip.server.admission import Reservation
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.server.values import RoundTripAnswer, RoundTripInput
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.workers import (
    SERVING,
    InProcessWorker,
    WorkerProcess,
    serving_process,
    serving_worker,
)

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SMALL = (5, np.linspace(-1, 1, 3, dtype=np.float32), 4)


ANSWERED_IN_STREAMS = 'roundtrip_requests_total{code="OK",method="RoundTripStream"}'


def wait_until_steady(worker: WorkerProcess, sample: str, seconds: float = 2.0) -> float:
    """Wait until ``sample`` stops changing for ``seconds`` (at most a minute); return it."""
    last, since, started = worker.metric(sample), time.monotonic(), time.monotonic()
    while time.monotonic() - since < seconds and time.monotonic() - started < 60:
        time.sleep(0.25)
        now = worker.metric(sample)
        if now != last:
            last, since = now, time.monotonic()
    return last


def large_answers(count: int) -> Iterator[pb.RoundTripStreamRequest]:
    """Stream messages whose answers carry both outputs: 64 x 1024 -> 64 x 1024 (256 KiB an
    output), each a fresh seed."""
    x = np.linspace(-1, 1, 64 * 1024, dtype=np.float32).reshape(64, 1024)
    for index in range(count):
        yield pb.RoundTripStreamRequest(
            id=index, request=build_request(index, x, 1024, return_outputs=True)
        )


def test_the_batcher_computes_again_once_an_unread_stream_is_cancelled() -> None:
    """A stream whose large answers are not read fills the byte budget; once it is cancelled
    its bytes come back, and small calls are computed again at once (the batcher waited for a
    running batch to finish, not for bytes to come back, and so waited for good)."""
    with (
        serving_process(
            "--warmup-shapes", "3:4,64:1024", "--max-inflight-bytes", str(256 * MIB)
        ) as worker,
        grpc.insecure_channel(worker.target, channel_options()) as channel,
    ):
        stub = pb_grpc.RoundTripServiceStub(channel)
        for _ in range(3):  # the wedge needs a batch refused right after one finished
            stream = stub.RoundTripStream(large_answers(400), timeout=120)
            wait_until_steady(worker, ANSWERED_IN_STREAMS)  # the budget is full
            stream.cancel()
            with RoundTripClient(worker.target, timeout=10) as client:
                for _ in range(3):
                    answer = client.round_trip(*SMALL)
                    assert answer.as_list() == list(reference(*SMALL))


def test_a_queue_that_stops_moving_turns_health_not_serving_until_it_moves() -> None:
    """The safety net under the budget: should bytes never come back (a bug in what holds
    them), requests wait with nothing computing. After max_stall_s the worker stops saying
    SERVING (health, V2 ready, roundtrip_stalled, a log line); once the bytes come back the
    queue moves, and it says SERVING again."""
    with serving_worker("--warmup-shapes", "3:4", "--max-stall-s", "0.5") as worker:
        pipeline = worker.worker.pipeline
        item = RoundTripInput(SMALL[0], SMALL[1], SMALL[2])

        async def hold_everything() -> tuple[Reservation, asyncio.Future[RoundTripAnswer]]:
            every_byte = pipeline.budget.reserve(pipeline.budget.limit)
            ticket = pipeline.batcher.enqueue(item, compute_bytes=64 * 1024)
            return every_byte, ticket.future

        every_byte, answer = worker.run(hold_everything())
        assert poll(lambda: worker.health() == NOT_SERVING, 10)
        assert worker.metric("roundtrip_stalled") == 1
        assert worker.event("stalled")["queued"] == 0  # the batch waits for bytes, taken
        assert rest_ready(worker) == 503
        worker.loop.call_soon_threadsafe(every_byte.release)
        assert poll(lambda: worker.health() == SERVING, 10)
        assert worker.metric("roundtrip_stalled") == 0
        assert rest_ready(worker) == 200

        async def computed() -> RoundTripAnswer:
            return await answer

        assert worker.run(computed()).as_list() == list(reference(*SMALL))


def poll(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition`` holds within ``seconds`` (checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def rest_ready(worker: InProcessWorker) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", worker.http_port, timeout=10)
    try:
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status
    finally:
        connection.close()


#: x of 64 rows of 1024, features 1024: 256 KiB an output, about 20 MiB a working set.
WIDE_X = np.linspace(-1, 1, 64 * 1024, dtype=np.float32).reshape(64, 1024)
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"


def v2_large_answers(seeds: list[int]) -> v2pb.ModelInferRequest:
    """A V2 call of len(seeds) requests of WIDE_X asking for both outputs."""
    request = v2pb.ModelInferRequest(model_name="roundtrip")
    x = np.stack([WIDE_X] * len(seeds)) if len(seeds) > 1 else WIDE_X
    tensors = (
        ("seed", "INT64", np.asarray(seeds, "<i8")),
        ("x", "FP32", x),
        ("features", "INT64", np.asarray([1024], "<i8")),
    )
    for name, datatype, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=data.shape)
        request.raw_input_contents.append(data.tobytes())
    for name in ("orig_out", "merged_out"):
        request.outputs.add(name=name)
    return request


def rest_large_answer(seed: int) -> tuple[bytes, dict[str, str]]:
    """A V2 REST body of WIDE_X as binary data, asking for both outputs as binary data."""
    binary = {"binary_data": True}
    head = json.dumps(
        {
            "inputs": [
                {"name": "seed", "datatype": "INT64", "shape": [1], "data": [seed]},
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": list(WIDE_X.shape),
                    "parameters": {"binary_data_size": WIDE_X.nbytes},
                },
                {"name": "features", "datatype": "INT64", "shape": [1], "data": [1024]},
            ],
            "outputs": [
                {"name": "orig_out", "parameters": binary},
                {"name": "merged_out", "parameters": binary},
            ],
        }
    ).encode()
    return head + WIDE_X.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def door_loads(worker: WorkerProcess, seconds: float) -> dict[str, Callable[[], Counter[str]]]:
    """Callers of every door asking for large answers, each for ``seconds``: their outcomes
    by code (a stream's or a batch's by the code of each of its messages)."""
    until = time.monotonic() + seconds

    def calls(call: Callable[[], list[str]]) -> Callable[[], Counter[str]]:
        def run() -> Counter[str]:
            codes: Counter[str] = Counter()
            while time.monotonic() < until:
                try:
                    codes.update(call())
                except grpc.RpcError as error:
                    codes[error.code().name] += 1
            return codes

        return run

    channel = worker.channel()
    stub = pb_grpc.RoundTripServiceStub(channel)
    infer = channel.unary_unary(
        INFER_PATH,
        request_serializer=v2pb.ModelInferRequest.SerializeToString,
        response_deserializer=v2pb.ModelInferResponse.FromString,
    )
    one = build_request(1, WIDE_X, 1024, return_outputs=True)
    batch = pb.RoundTripBatchRequest(
        requests=[build_request(seed, WIDE_X, 1024, return_outputs=True) for seed in range(8)]
    )
    body, headers = rest_large_answer(3)
    two = v2_large_answers([5, 6])

    def round_trip() -> list[str]:
        stub.RoundTrip(one, timeout=60)
        return ["OK"]

    def round_trip_batch() -> list[str]:
        answer = stub.RoundTripBatch(batch, timeout=60)
        return [str(o.error.code) if o.HasField("error") else "OK" for o in answer.outcomes]

    def stream() -> list[str]:
        answers = stub.RoundTripStream(large_answers(16), timeout=60)
        return [str(a.error.code) if a.HasField("error") else "OK" for a in answers]

    def model_infer() -> list[str]:
        infer(two, timeout=60)
        return ["OK"]

    def rest() -> list[str]:
        return [str(post(worker.http_port, body, headers)[0])]

    return {
        "RoundTrip": calls(round_trip),
        "RoundTripBatch": calls(round_trip_batch),
        "RoundTripStream": calls(stream),
        "ModelInfer": calls(model_infer),
        "ModelInferHTTP": calls(rest),
    }


def test_admitted_bytes_never_exceed_the_limit_on_any_door() -> None:
    """Large answers through every door at once, on a budget they overfill: what the worker
    holds, sampled throughout (and its own peak), stays within max_inflight_bytes. (Answers
    used to take their bytes after compute without a check: 2.2-2.7 GiB held on 2 GiB.)"""
    limit = 256 * MIB
    with serving_process(
        "--warmup-shapes", "3:4,64:1024", "--max-inflight-bytes", str(limit)
    ) as worker:
        loads = door_loads(worker, seconds=8)
        with Sampler(worker, "roundtrip_admitted_bytes") as admitted:
            outcomes = in_threads(*[load for load in loads.values() for _ in range(3)])
        assert admitted.samples > 20
        assert admitted.most <= limit
        assert worker.metric("roundtrip_admitted_bytes_peak") <= limit
        by_door = dict(zip([door for door in loads for _ in range(3)], outcomes, strict=True))
        for door, codes in by_door.items():
            assert codes["OK"] + codes["200"] > 0, (door, codes)  # each door answered some
        assert wait_until_steady(worker, "roundtrip_admitted_bytes") == 0
