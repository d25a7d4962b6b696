"""One caller can neither starve nor exhaust the worker, through any door.

Each test is an attack measured against a real worker process on its default limits
(unless it names others): what the attacker gets is a clear refusal, and what everyone
else gets (health within its probe's budget, exact answers, the memory bound) holds.
"""

from __future__ import annotations

import json
import socket
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from callers import INFER, HealthPoller, in_threads, outcome, post, stalled_upload
from reference import reference

from roundtrip.client import RoundTripClient, RoundTripError
from roundtrip.client.messages import build_request
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.polling import wait_for
from support.rss import RssSampler
from support.v2_stub import V2Stub
from support.workers import WorkerProcess, serving_process, serving_worker

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
BUDGET_MIB = 2048  # the default max_inflight_bytes where the machine sets no cgroup limit


@pytest.fixture(scope="module")
def short_read_worker() -> Iterator[WorkerProcess]:
    with serving_process("--warmup-shapes", "3:4", "--http-read-timeout-s", "2") as process:
        yield process


def gzip_bomb(inflated: int = 1024 * MIB) -> bytes:
    """A gzip body of about 1 MiB that inflates to ``inflated`` bytes of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(16 * MIB)
    parts = [packer.compress(zeros) for _ in range(inflated // len(zeros))]
    return b"".join([*parts, packer.flush()])


def exact_round_trip(client: RoundTripClient, seed: int) -> bool:
    x = np.arange(1, 4, dtype=np.float32) * (seed + 1)
    return client.round_trip(seed, x, 4).as_list() == list(reference(seed, x, 4))


def test_rest_abuse_never_delays_grpc_health_or_other_callers(
    short_read_worker: WorkerProcess,
) -> None:
    bomb = gzip_bomb()
    assert len(bomb) < 2 * MIB
    fourteen_mib = json.dumps({"inputs": [{"name": "x", "data": [[0]] * (14 * MIB // 6)}]})
    largest_json_outputs = {
        "inputs": [
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [0]},
            {"name": "x", "datatype": "FP32", "shape": [1, 64, 1], "data": [0.5] * 64},
            {"name": "features", "datatype": "INT64", "shape": [1], "data": [65536]},
        ],
        "outputs": [{"name": "orig_out"}, {"name": "merged_out"}],
    }
    gzipped = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    port = short_read_worker.http_port
    with RssSampler(short_read_worker) as rss, HealthPoller(short_read_worker.target) as health:
        with RoundTripClient(short_read_worker.target, timeout=30) as client:
            answers = in_threads(
                *[lambda: post(port, bomb, gzipped) for _ in range(8)],
                *[lambda: post(port, fourteen_mib.encode()) for _ in range(4)],
                lambda: post(port, json.dumps(largest_json_outputs).encode()),
                lambda: [exact_round_trip(client, seed) for seed in range(20)],
            )
        wait_for(lambda: health.polls >= 5, "health polled")
    assert health.polls >= 5
    assert health.late == []
    outputs, small = answers[12:]
    assert {status for status, _ in answers[:8]} <= {413, 0}  # the bombs
    assert {status for status, _ in answers[8:12]} <= {413, 0}  # the 14 MiB bodies
    assert outputs[0] == 400
    assert "max_json_output_elements" in json.loads(outputs[1])["error"]
    assert small == [True] * 20
    assert rss.peak < BUDGET_MIB + 512
    assert (
        short_read_worker.metric(
            'roundtrip_requests_total{code="INTERNAL",method="ModelInferHTTP"}'
        )
        == 0
    )


def test_stalled_uploads_hold_what_they_sent_then_time_out(
    short_read_worker: WorkerProcess,
) -> None:
    """Sixteen uploads that declare 64 MiB, send 60 and go silent: each holds what it sent
    (all but what the sockets still buffer), not what it declared, until it times out."""
    before = short_read_worker.rss_mib()
    uploads = in_threads(
        *[lambda: stalled_upload(short_read_worker.http_port, 64 * MIB, 60 * MIB)] * 16
    )
    try:
        held = short_read_worker.metric("roundtrip_admitted_bytes")
        refused = short_read_worker.metric(
            'roundtrip_requests_total{code="RESOURCE_EXHAUSTED",method="ModelInferHTTP"}'
        )
        assert held + refused * 60 * MIB >= 16 * 56 * MIB  # each is counted, or was refused
        assert held <= 16 * 60 * MIB  # what arrived, never what was declared
        for upload in uploads:
            upload.settimeout(20)
            answer = upload.recv(4096)  # the worker's 408 (or 429 for one it refused)
            assert answer.split(b" ")[1] in (b"408", b"429"), answer[:200]
    finally:
        for upload in uploads:
            upload.close()
    wait_for(
        lambda: short_read_worker.metric("roundtrip_admitted_bytes") == 0, "the uploads' bytes back"
    )
    assert short_read_worker.rss_mib() < before * 1.1


def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    short_read_worker: WorkerProcess,
) -> None:
    with socket.create_connection(
        ("127.0.0.1", short_read_worker.http_port), timeout=10
    ) as connection:
        connection.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {100 * MIB}\r\n\r\n".encode()
        )
        answer = connection.recv(4096)  # not one body byte sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_message_bytes" in answer


def packed_seed_infer(count: int) -> bytes:
    """A ModelInferRequest whose seed holds ``count`` packed zeros (one wire byte each),
    serialized by hand: building it with protobuf would take the memory under test."""

    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    contents = field(3, bytes(count))  # InferTensorContents.int64_contents, packed
    tensor = field(1, b"seed") + field(2, b"INT64") + field(3, _varint(count)) + field(5, contents)
    return field(1, b"roundtrip") + field(5, tensor)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_huge_v2_seed_tensors_are_refused_before_they_are_parsed(
    short_read_worker: WorkerProcess,
) -> None:
    """60,000,000 packed zeros take 57 MiB on the wire and 458 MiB once parsed: they are
    counted on the wire and refused, naming the limit, before protobuf parses them."""
    message = packed_seed_infer(60_000_000)
    assert 56 * MIB < len(message) < 64 * MIB
    with short_read_worker.channel() as channel:
        infer = V2Stub(channel).ModelInferBytes

        with RssSampler(short_read_worker) as rss:
            codes = in_threads(*[lambda: outcome(infer, message)] * 4)
    assert all(code.startswith("INVALID_ARGUMENT") for code in codes), codes
    assert all("max_batch_items" in code for code in codes), codes
    # gRPC holds each message (57 MiB) and hands the parser a copy before any handler runs:
    # some 2 x 228 MiB is the floor. Parsed, the four seeds alone would be 1.8 GiB.
    assert rss.peak - rss.before < 512


def delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


#: An unknown group (field 1000, wire types 3 and 4) holding an unknown varint: valid, kept
#: by protobuf as bytes; the old check gave up on it and let protobuf parse what followed.
GROUP = _varint(1000 << 3 | 3) + _varint(1001 << 3) + b"\x01" + _varint(1000 << 3 | 4)


def walked_around() -> dict[str, bytes]:
    """Messages that once walked around the pre-parse check, each some 57-60 MB: what
    protobuf would build of them is GiBs (a group before the big field), or one merged
    sub-message of tens of millions of elements given piece by piece."""
    seed_tensor = delimited(1, b"seed") + delimited(2, b"INT64")
    thousand_zeros = delimited(5, delimited(3, bytes(1000)))  # contents: 1,000 packed zeros
    thirty_two_dims = delimited(2, delimited(2, bytes(32)))  # x: Array.shape of 32 zeros
    return {
        "RoundTripBatch of 30 M items after a group": GROUP + delimited(1, b"") * 30_000_000,
        "60 M seeds after a group": delimited(1, b"roundtrip")
        + delimited(5, GROUP + seed_tensor + delimited(5, delimited(3, bytes(60_000_000)))),
        "a seed tensor's contents given 59,001 times": delimited(1, b"roundtrip")
        + delimited(5, seed_tensor + thousand_zeros * 59_001),
        "x's shape given 1.7 M times": thirty_two_dims * 1_700_000,
        "RoundTripBatch of 8 M items": delimited(1, b"") * 8_000_000,
    }


WALKED_AROUND_METHODS = {
    "RoundTripBatch of 30 M items after a group": "/roundtrip.v1.RoundTripService/RoundTripBatch",
    "60 M seeds after a group": "/inference.GRPCInferenceService/ModelInfer",
    "a seed tensor's contents given 59,001 times": "/inference.GRPCInferenceService/ModelInfer",
    "x's shape given 1.7 M times": "/roundtrip.v1.RoundTripService/RoundTrip",
    "RoundTripBatch of 8 M items": "/roundtrip.v1.RoundTripService/RoundTripBatch",
}


@pytest.mark.parametrize("attack", list(WALKED_AROUND_METHODS))
def test_encodings_that_walked_around_the_check_are_refused_before_the_parse(
    short_read_worker: WorkerProcess, attack: str
) -> None:
    """Each message is refused INVALID_ARGUMENT naming its limit, RSS grows by no more than
    two copies of each of the two at once (gRPC's received buffer and the bytes handed to
    the check) and 64 MiB (it was 0.9-3.1 GiB), and gRPC health answers within 1 s
    throughout (the check ran per field on the event loop: it was blocked 8-17 s)."""
    message = walked_around()[attack]
    assert len(message) < 64 * MIB
    with short_read_worker.channel() as channel:
        call = channel.unary_unary(
            WALKED_AROUND_METHODS[attack],
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )

        with (
            RssSampler(short_read_worker) as rss,
            HealthPoller(short_read_worker.target, deadline_s=1.0) as health,
        ):
            codes = in_threads(*[lambda: outcome(call, message)] * 2)
    assert all(code.startswith("INVALID_ARGUMENT") for code in codes), codes
    assert all("limit" in code for code in codes), codes
    bound = 2 * 2 * len(message) / MIB + 64
    assert rss.peak - rss.before < bound, f"RSS grew {rss.peak - rss.before:.0f} > {bound:.0f} MiB"
    assert health.late == []


def test_refused_messages_are_freed_as_their_calls_end(short_read_worker: WorkerProcess) -> None:
    """Thirty 32 MiB RoundTrip messages, each refused (features 0), one after another: each
    is freed as its call ends, so memory holds one at a time. (grpc keeps an aborted call's
    exception in a reference cycle with the handler's frame: while that frame held the
    message, the thirty stayed in memory, uncounted, until a collector pass: +1 GiB.)"""
    request = build_request(1, np.ones(8 * MIB, np.float32), 0)
    with short_read_worker.channel() as channel, RssSampler(short_read_worker) as rss:
        stub = pb_grpc.RoundTripServiceStub(channel)
        codes = Counter[str]()
        for _ in range(30):
            try:
                stub.RoundTrip(request, timeout=60)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
    assert codes == {"INVALID_ARGUMENT": 30}
    assert rss.peak - rss.before < 256, f"RSS grew {rss.peak - rss.before:.0f} MiB"


def test_answers_too_large_to_send_are_refused_before_compute() -> None:
    """Over max_message_bytes an answer can never be sent: every door says so before any
    compute, with a code that is not retried, and the metrics count that code."""
    with serving_worker("--max-message-bytes", str(MIB), "--warmup-shapes", "3:4") as process:
        x = np.ones((64, 4), np.float32)
        big = build_request(0, x, 4096, return_outputs=True)  # 2 x 1 MiB of outputs
        channel = process.channel()
        stub = pb_grpc.RoundTripServiceStub(channel)
        batches_before = process.metric("roundtrip_batch_size_count")
        calls: dict[str, Callable[[], Any]] = {
            "RoundTrip": lambda: stub.RoundTrip(big, timeout=30),
            "RoundTripBatch": lambda: stub.RoundTripBatch(
                pb.RoundTripBatchRequest(
                    requests=[build_request(s, x[:8], 4096, return_outputs=True) for s in range(8)]
                ),
                timeout=30,
            ),
            "ModelInfer": lambda: V2Stub(channel).ModelInfer(
                v2pb.ModelInferRequest(
                    model_name="roundtrip",
                    inputs=[
                        v2pb.ModelInferRequest.InferInputTensor(
                            name="seed", datatype="INT64", shape=[1]
                        ),
                        v2pb.ModelInferRequest.InferInputTensor(
                            name="x", datatype="FP32", shape=[1, 64, 4]
                        ),
                        v2pb.ModelInferRequest.InferInputTensor(
                            name="features", datatype="INT64", shape=[1]
                        ),
                    ],
                    outputs=[v2pb.ModelInferRequest.InferRequestedOutputTensor(name="orig_out")],
                    raw_input_contents=[
                        np.int64(0).tobytes(),
                        x.tobytes(),
                        np.int64(4096).tobytes(),
                    ],
                ),
                timeout=30,
            ),
        }
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "max_message_bytes" in (refused.value.details() or ""), method
            sample = f'roundtrip_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}'
            assert process.metric(sample) >= 1, method
        assert process.metric("roundtrip_batch_size_count") == batches_before  # nothing computed
        channel.close()


def test_unary_callers_are_served_while_batch_callers_saturate_the_queue() -> None:
    with serving_process("--warmup-shapes", "3:4") as process:
        x = np.arange(1, 4, dtype=np.float32)
        batch = pb.RoundTripBatchRequest(
            requests=[build_request(seed, x, 4) for seed in range(1024)]
        )
        stop = threading.Event()
        unary: Counter[str] = Counter()

        def batch_caller() -> Counter[str]:
            outcomes: Counter[str] = Counter()
            with process.channel() as channel:
                stub = pb_grpc.RoundTripServiceStub(channel)
                for _ in range(2):
                    answer = stub.RoundTripBatch(batch, timeout=120)
                    for outcome in answer.outcomes:
                        failed = outcome.HasField("error")
                        outcomes[f"code {outcome.error.code}" if failed else "OK"] += 1
            return outcomes

        def unary_caller() -> None:
            with RoundTripClient(process.target, timeout=60) as client:
                while not stop.is_set():
                    try:
                        client.round_trip(7, x, 4)
                        unary["OK"] += 1
                    except RoundTripError as error:
                        unary[error.code.name] += 1

        callers = [threading.Thread(target=unary_caller) for _ in range(4)]
        for caller in callers:
            caller.start()
        try:
            batches = in_threads(*[batch_caller] * 4)
        finally:
            stop.set()
            for caller in callers:
                caller.join(60)
        assert unary["RESOURCE_EXHAUSTED"] == 0, unary
        assert unary["OK"] > 0
        assert sum(batches, Counter()) == Counter({"OK": 4 * 2 * 1024})
