"""RoundTripStream: ids echo, a bad message gets its own error, the stream goes on."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from reference import numbers, reference

from roundtrip.client import AsyncRoundTripClient, InvalidArgumentError, RoundTripClient
from roundtrip.client.messages import build_request
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.workers import WorkerProcess


def test_stream_answers_in_request_order_and_exact(client: RoundTripClient) -> None:
    rng = np.random.default_rng(5)
    cases = [(i, rng.standard_normal(64).astype(np.float32), 64) for i in range(300)]
    outcomes = list(client.stream(cases))
    assert len(outcomes) == len(cases)
    for outcome, c in zip(outcomes, cases, strict=True):
        assert np.array_equal(numbers(outcome), reference(*c))


def test_bad_message_gets_its_own_error_and_the_stream_goes_on(client: RoundTripClient) -> None:
    cases = [(0, [1, 2, 3], 4), (0, [1, 2, 3], 0), (1, [1, 2, 3], 4)]
    first, bad, last = client.stream(cases)
    assert isinstance(bad, InvalidArgumentError)
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert np.array_equal(numbers(first), reference(0, np.array([1, 2, 3], dtype=np.float32), 4))
    assert np.array_equal(numbers(last), reference(1, np.array([1, 2, 3], dtype=np.float32), 4))


def test_each_response_carries_its_request_id(worker: WorkerProcess) -> None:
    ids = [10**15 + 3, 7, 42, 2**64 - 1]
    with grpc.insecure_channel(worker.target) as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)
        messages = [
            pb.RoundTripStreamRequest(id=i, request=build_request(i % 1000, [1, 2], 3)) for i in ids
        ]
        responses = list(stub.RoundTripStream(iter(messages), timeout=60))
    assert sorted(r.id for r in responses) == sorted(ids)
    for response in responses:
        expected = reference(response.id % 1000, np.array([1, 2], dtype=np.float32), 3)
        got = [
            response.response.orig_sum,
            response.response.merged_sum,
            response.response.max_abs_diff,
        ]
        assert np.array_equal(got, expected)


def test_async_stream_twin(worker: WorkerProcess) -> None:
    async def run() -> list[object]:
        async with AsyncRoundTripClient(worker.target) as client:
            return [o async for o in client.stream([(3, [1.0], 2), (4, [2.0], 2)])]

    first, second = asyncio.run(run())
    assert np.array_equal(numbers(first), reference(3, np.array([1.0], dtype=np.float32), 2))
    assert np.array_equal(numbers(second), reference(4, np.array([2.0], dtype=np.float32), 2))
