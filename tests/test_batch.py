"""RoundTripBatch: many requests in one message, each answered as if alone, in order."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import grpc
import ml_dtypes
import numpy as np
import pytest
from reference import numbers, reference, reference_with_outputs

from roundtrip.client import (
    AsyncRoundTripClient,
    DeadlineExceededError,
    InvalidArgumentError,
    RoundTripClient,
    RoundTripError,
    RoundTripResult,
)
from roundtrip.client.messages import build_request
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.polling import wait_for
from support.workers import (
    InProcessWorker,
    WorkerProcess,
    busy_lane,
    console_script,
    serving_worker,
)

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def mixed_cases(count: int) -> list[tuple[int, np.ndarray, int, str]]:
    """Seeds, shapes (ranks 1-3), features and dtypes all varying."""
    rng = np.random.default_rng(11)
    cases = []
    for index in range(count):
        shape = [(3,), (2, 5), (2, 1, 4), (64,)][index % 4]
        dtype = ["float32", "float64", "float16", "bfloat16"][index % 3]
        x = rng.standard_normal(shape)
        cases.append((int(rng.integers(-(2**40), 2**40)), x, 1 + index % 7, dtype))
    return cases


def as_sent(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as the worker receives it: cast to the wire dtype."""
    return np.asarray(x, ml_dtypes.bfloat16 if dtype == "bfloat16" else DTYPES[dtype])


def test_outcomes_come_in_request_order_each_exact(client: RoundTripClient) -> None:
    cases = mixed_cases(48)
    for dtype in ("float32", "float16", "bfloat16"):
        chosen = [(seed, x, features) for seed, x, features, d in cases if d == dtype]
        outcomes = client.round_trip_many(chosen, dtype=dtype)
        assert len(outcomes) == len(chosen)
        for outcome, (seed, x, features) in zip(outcomes, chosen, strict=True):
            assert isinstance(outcome, RoundTripResult)
            assert np.array_equal(outcome.as_list(), reference(seed, as_sent(x, dtype), features))


def test_sixty_four_seeds_in_one_message_equal_sixty_four_calls(client: RoundTripClient) -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    outcomes = client.round_trip_many([(seed, x, 64) for seed in range(64)])
    alone = [client.round_trip(seed, x, 64) for seed in range(64)]
    assert [numbers(o).tolist() for o in outcomes] == [a.as_list() for a in alone]


def test_outputs_come_back_per_item(client: RoundTripClient) -> None:
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    [outcome] = client.round_trip_many([(9, x, 2)], return_outputs=True)
    _, orig_out, merged_out = reference_with_outputs(9, x, 2)
    assert isinstance(outcome, RoundTripResult)
    assert outcome.orig_out is not None
    assert np.array_equal(outcome.orig_out, orig_out)
    assert outcome.merged_out is not None
    assert np.array_equal(outcome.merged_out, merged_out)


def test_a_bad_item_gets_its_own_error_and_the_others_are_answered(
    client: RoundTripClient,
) -> None:
    first, bad, too_wide, last = client.round_trip_many(
        [(0, [1, 2, 3], 4), (0, [1, 2, 3], 0), (0, [1.0], 10**6), (1, [1, 2, 3], 4)]
    )
    assert isinstance(bad, InvalidArgumentError)
    assert "features must be >= 1" in bad.message
    assert isinstance(too_wide, InvalidArgumentError)  # a hard limit: never retried
    assert "max_features" in too_wide.message
    assert np.array_equal(numbers(first), reference(0, np.array([1, 2, 3], dtype=np.float32), 4))
    assert np.array_equal(numbers(last), reference(1, np.array([1, 2, 3], dtype=np.float32), 4))


def test_an_empty_batch_has_no_outcomes(client: RoundTripClient) -> None:
    assert client.round_trip_many([]) == []


def test_undecodable_bytes_are_invalid_argument(worker: WorkerProcess) -> None:
    with grpc.insecure_channel(worker.target) as channel:
        call = channel.unary_unary("/roundtrip.v1.RoundTripService/RoundTripBatch", None, None)
        with pytest.raises(grpc.RpcError) as raised:
            call(b"\x0a\xff\xff", timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RoundTripBatchRequest" in str(raised.value.details())


def test_items_are_counted_by_their_code_and_join_the_shared_batches(
    worker: WorkerProcess, client: RoundTripClient
) -> None:
    ok = 'roundtrip_requests_total{code="OK",method="RoundTripBatch"}'
    invalid = 'roundtrip_requests_total{code="INVALID_ARGUMENT",method="RoundTripBatch"}'
    batches = "roundtrip_batch_size_count"
    before = {name: worker.metric(name) for name in (ok, invalid, batches)}
    x = np.linspace(-1, 1, 3, dtype=np.float32)
    client.round_trip_many([*((seed, x, 4) for seed in range(32)), (0, x, 0)])
    assert worker.metric(ok) - before[ok] == 32
    assert worker.metric(invalid) - before[invalid] == 1
    assert worker.metric(batches) - before[batches] < 32  # shared batches, not one each


def test_the_async_client_has_the_twin(worker: WorkerProcess) -> None:
    async def run() -> list[RoundTripResult | RoundTripError]:
        async with AsyncRoundTripClient(worker.target) as client:
            return await client.round_trip_many([(3, [1.0], 2), (4, [2.0], 0)])

    first, second = asyncio.run(run())
    assert isinstance(first, RoundTripResult)
    assert np.array_equal(first.as_list(), reference(3, np.array([1.0], dtype=np.float32), 2))
    assert isinstance(second, InvalidArgumentError)


def test_the_cli_sends_its_input_lines_as_one_batch(worker: WorkerProcess) -> None:
    lines = '{"seed": 0, "x": [1, 2, 3], "features": 4}\n{"seed": 0, "x": [1], "features": 0}\n'
    done = subprocess.run(
        [console_script("roundtrip"), "many", "--target", worker.target],
        input=lines,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1  # one request refused
    first, second = done.stdout.splitlines()
    assert first == '{"orig_sum": -4.2219334, "merged_sum": -4.2219334, "max_abs_diff": 0.0}'
    assert '"code": "INVALID_ARGUMENT"' in second


def test_more_items_than_max_batch_items_is_invalid_argument() -> None:
    with (
        serving_worker("--warmup-shapes", "3:4", "--max-batch-items", "4") as worker,
        RoundTripClient(worker.target) as client,
    ):
        assert len(client.round_trip_many([(0, [1.0], 1)] * 4)) == 4
        with pytest.raises(InvalidArgumentError, match="max_batch_items"):
            client.round_trip_many([(0, [1.0], 1)] * 5)
        assert client.server_info().limits.max_batch_items == 4


def test_a_raw_batch_message_from_the_generated_stub(worker: WorkerProcess) -> None:
    """Any language's stub: requests in, outcomes (response or error) out."""
    batch = pb.RoundTripBatchRequest(
        requests=[build_request(0, [1, 2, 3], 4), pb.RoundTripRequest(features=4)]
    )
    with grpc.insecure_channel(worker.target) as channel:
        response = pb_grpc.RoundTripServiceStub(channel).RoundTripBatch(batch, timeout=30)
    first, missing_x = response.outcomes
    assert first.response.orig_sum == np.float32(-4.2219334)
    assert missing_x.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "x is required" in missing_x.error.message


def test_a_batch_past_its_deadline_counts_each_item_and_gives_back_its_bytes(
    worker: WorkerProcess, client: RoundTripClient
) -> None:
    """The caller's deadline passes while its items wait or compute: every item is counted
    by that code, and every byte it reserved is given back."""
    dropped = 'roundtrip_requests_total{code="DEADLINE_EXCEEDED",method="RoundTripBatch"}'
    before = worker.metric(dropped)
    x = np.linspace(-1, 1, 512, dtype=np.float32)
    with pytest.raises(DeadlineExceededError):
        client.round_trip_many([(seed, x, 2048) for seed in range(16)], timeout=0.2)
    for _ in range(100):
        if worker.metric(dropped) - before == 16 and worker.metric("roundtrip_admitted_bytes") == 0:
            break
        time.sleep(0.1)
    assert worker.metric(dropped) - before == 16
    assert worker.metric("roundtrip_admitted_bytes") == 0


@pytest.fixture(scope="module")
def four_per_batch() -> Iterator[InProcessWorker]:
    with serving_worker("--warmup-shapes", "3:4", "--max-batch-size", "4") as process:
        yield process


def test_a_batchs_same_shape_requests_join_one_engine_batch_whole(
    four_per_batch: InProcessWorker,
) -> None:
    """While the lane is busy with a first call's batch, two single calls queue, then a
    message of three requests of their shape. The three join one batch together (2 + 3 is
    over 4, so they wait for the next), rather than two of them filling the second batch
    and the last running alone."""
    worker = four_per_batch
    x = np.array([1.0, 2.0, 3.0], np.float32)
    bucket = 'roundtrip_batch_size_bucket{le="1.0"}'
    before = {name: worker.metric(name) for name in (bucket, "roundtrip_batch_size_count")}
    with worker.channel() as channel, busy_lane(worker) as release:
        stub = pb_grpc.RoundTripServiceStub(channel)
        calls = [stub.RoundTrip.future(build_request(1, x, 4), timeout=60)]
        # its batch formed: it reserved its working set, and waits for the lane
        wait_for(lambda: worker.metric("roundtrip_computing_bytes") > 0, "a batch of one")
        calls += [stub.RoundTrip.future(build_request(s, x, 4), timeout=60) for s in (2, 3)]
        wait_for(lambda: worker.metric("roundtrip_queued_requests") == 2, "two queued")
        many = stub.RoundTripBatch.future(
            pb.RoundTripBatchRequest(requests=[build_request(s, x, 4) for s in (4, 5, 6)]),
            timeout=60,
        )
        wait_for(lambda: worker.metric("roundtrip_queued_requests") == 5, "five queued")
        release.set()
        answers = [call.result() for call in calls]
        answers += [outcome.response for outcome in many.result().outcomes]
    for seed, answer in enumerate(answers, start=1):
        got = (answer.orig_sum, answer.merged_sum, answer.max_abs_diff)
        assert np.array_equal(np.array(got, np.float32), reference(seed, x, 4))
    assert worker.metric("roundtrip_batch_size_count") - before["roundtrip_batch_size_count"] == 3
    assert worker.metric(bucket) - before[bucket] == 1  # [1], [2, 3], [4, 5, 6]


def test_a_request_that_fails_to_decode_gets_its_own_error_beside_its_group(
    client: RoundTripClient, worker: WorkerProcess
) -> None:
    """Its declared shape weighs like its neighbours' (so it is admitted with them), and its
    payload is short: it alone is INVALID_ARGUMENT."""
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    requests = [build_request(seed, x, 4) for seed in range(5)]
    requests[2].x.raw = requests[2].x.raw[:12]
    with grpc.insecure_channel(worker.target) as channel:
        response = pb_grpc.RoundTripServiceStub(channel).RoundTripBatch(
            pb.RoundTripBatchRequest(requests=requests), timeout=60
        )
    for seed, outcome in enumerate(response.outcomes):
        if seed == 2:
            assert outcome.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "x.raw" in outcome.error.message
            continue
        answer = outcome.response
        got = (answer.orig_sum, answer.merged_sum, answer.max_abs_diff)
        assert np.array_equal(np.array(got, np.float32), reference(seed, x, 4))
    wait_for(lambda: worker.metric("roundtrip_admitted_bytes") == 0, "every byte given back")


def test_requests_that_weigh_the_same_in_other_dtypes_are_each_exact(
    client: RoundTripClient,
) -> None:
    """float16 and bfloat16 requests of one shape weigh the same and are admitted together;
    each computes in its own dtype, with its own reference's bits."""
    rng = np.random.default_rng(5)
    cases = [
        (seed, rng.standard_normal((2, 8)), ("float16", "bfloat16")[seed % 2]) for seed in range(12)
    ]
    outcomes = client.round_trip_many([(seed, as_sent(x, dtype), 3) for seed, x, dtype in cases])
    for (seed, x, dtype), outcome in zip(cases, outcomes, strict=True):
        assert np.array_equal(numbers(outcome), reference(seed, as_sent(x, dtype), 3))
