"""Memory is bounded by bytes: admission weighs each request, and unread answers are not piled up.

The figures under default settings (RSS against the idle level for 6,000
unread answers and for 64 concurrent 16 MiB requests) come from
``bench/memory_bounds.py`` and are written in docs/operations.md; these tests
check the mechanisms with small limits.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from reference import reference

from roundtrip.client import InvalidArgumentError, RoundTripClient, RoundTripError
from roundtrip.client.channel import channel_options
from roundtrip.client.messages import build_request
from roundtrip.server.pipeline.admission import (
    DEFAULT_INFLIGHT_BYTES,
    container_memory_limit,
    default_inflight_bytes,
)
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.rss import RssSampler
from support.workers import WorkerProcess, serving_process

MIB = 1024 * 1024
BIG_X = np.random.default_rng(3).standard_normal((4096, 1024)).astype(np.float32)  # 16 MiB
SMALL = (5, np.linspace(-1, 1, 64, dtype=np.float32), 64)

pytestmark = pytest.mark.slow


def test_default_budget_is_half_the_container_limit(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("4294967296\n")
    assert container_memory_limit((v2, v1)) == 4 * 1024**3
    assert default_inflight_bytes(4 * 1024**3) == 2 * 1024**3
    v2.write_text("max\n")  # cgroup v2 without a limit
    assert container_memory_limit((v2, v1)) is None
    v1.write_text("9223372036854771712\n")  # cgroup v1 without a limit
    assert container_memory_limit((tmp_path / "absent", v1)) is None
    assert default_inflight_bytes(None) == DEFAULT_INFLIGHT_BYTES


def test_concurrent_large_requests_beyond_the_budget_are_refused_naming_the_knob() -> None:
    # Each 16 MiB request is weighed at about 150 MiB: 400 MiB admits two at a time.
    with serving_process("--warmup-shapes", "64:64", "--max-inflight-bytes", str(400 * MIB)) as w:
        outcomes: Counter[str] = Counter()
        messages: set[str] = set()
        lock = threading.Lock()
        expected = reference(0, BIG_X, 1024)

        def call(seed: int) -> None:
            with RoundTripClient(w.target, timeout=120) as client:
                try:
                    result = client.round_trip(0, BIG_X, 1024)
                    outcome = "ok" if np.array_equal(result.as_list(), expected) else "wrong"
                except RoundTripError as error:
                    outcome = error.code.name
                    with lock:
                        messages.add(str(error))
            with lock:
                outcomes[outcome] += 1

        threads = [threading.Thread(target=call, args=(seed,)) for seed in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert set(outcomes) == {"ok", "RESOURCE_EXHAUSTED"}, (outcomes, messages)
        assert all("max_inflight_bytes" in text for text in messages), messages
        # every reservation given back (the last ones once gRPC has sent their answers)
        assert wait_until_steady(w, "roundtrip_admitted_bytes", 1.0) == 0
        assert w.metric("roundtrip_admitted_bytes_limit") == 400 * MIB
        with RoundTripClient(w.target, timeout=60) as client:  # still serving, still exact
            assert np.array_equal(client.round_trip(*SMALL).as_list(), reference(*SMALL))


def test_a_request_larger_than_the_whole_budget_is_refused_naming_the_knob() -> None:
    with serving_process("--warmup-shapes", "3:4", "--max-inflight-bytes", str(64 * MIB)) as w:
        client = RoundTripClient(w.target, timeout=60)
        with client, pytest.raises(InvalidArgumentError, match="max_inflight_bytes"):
            client.round_trip(0, BIG_X, 1024)  # it could never run here: not retryable


def unread_requests(count: int) -> Iterator[pb.RoundTripStreamRequest]:
    """Requests whose answers carry both outputs: 64 x 1024 -> 64 x 1024, 512 KiB an answer."""
    x = np.linspace(-1, 1, 64 * 1024, dtype=np.float32).reshape(64, 1024)
    for index in range(count):
        yield pb.RoundTripStreamRequest(
            id=index, request=build_request(index, x, 1024, return_outputs=True)
        )


def wait_until_steady(worker: WorkerProcess, sample: str, seconds: float = 3.0) -> float:
    """Wait until ``sample`` stops changing for ``seconds`` with no request being computed
    (a first compilation can hold the first batch for longer than ``seconds``); return it."""
    last, since = worker.metric(sample), time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.1)
        now = worker.metric(sample)
        if now != last or worker.metric("roundtrip_inflight_requests"):
            last, since = now, time.monotonic()
    return last


def test_a_stream_whose_answers_are_not_read_stops_being_read() -> None:
    # A slot is held until the answer is written, so an unread stream gets at
    # most max_stream_inflight answers computed, plus what the socket buffers
    # took (a few MiB on loopback), never all 1,000.
    answered = 'roundtrip_requests_total{code="OK",method="RoundTripStream"}'
    with serving_process("--warmup-shapes", "3:4", "--max-stream-inflight", "8") as w:
        idle = w.rss_mib()
        with grpc.insecure_channel(w.target, channel_options()) as channel:
            stub = pb_grpc.RoundTripServiceStub(channel)
            call = stub.RoundTripStream(unread_requests(1000), timeout=120)
            computed = wait_until_steady(w, answered)
            held = w.metric("roundtrip_admitted_bytes")
            grown = w.rss_mib() - idle
            call.cancel()
        assert 8 <= computed <= 8 + 64, computed  # 64 answers of 512 KiB: 32 MiB of buffers
        assert held > 0  # the unwritten answers still hold their bytes
        assert grown < 256, grown  # 1,000 answers would be 500 MiB
        assert wait_until_steady(w, "roundtrip_admitted_bytes", 1.0) == 0
        with RoundTripClient(w.target, timeout=60) as client:
            assert np.array_equal(client.round_trip(*SMALL).as_list(), reference(*SMALL))


def test_a_batch_reserves_its_working_set_only_while_it_runs_and_waits_for_memory() -> None:
    """24 requests of some 136 MB working set each (3.3 GB together), in one RoundTripBatch,
    on an idle worker with two lanes and a 600 MiB budget: waiting, each holds only its
    input, so every one is admitted; a batch reserves its requests' working sets when a
    lane takes it, so at most four compute at once across both lanes, the others wait for
    memory, and every answer is exact with RSS under the budget."""
    x = np.linspace(-1, 1, 8 * 1024, dtype=np.float32).reshape(8, 1024)
    budget = 600 * MIB
    with serving_process(
        "--warmup-shapes",
        "3:4",
        "--max-inflight-bytes",
        str(budget),
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    ) as w:
        with RoundTripClient(w.target, timeout=300) as client, RssSampler(w) as rss:
            outcomes = client.round_trip_many([(seed, x, 8192) for seed in range(24)])
        for seed, outcome in enumerate(outcomes):
            assert not isinstance(outcome, RoundTripError), (seed, outcome)
            assert np.array_equal(outcome.as_list(), reference(seed, x, 8192)), seed
        assert rss.peak - rss.before < budget / MIB
        # no batch held more working sets than the budget: four of 136 MB (all 24 without it)
        batches = w.metric("roundtrip_batch_size_count")
        assert w.metric('roundtrip_batch_size_bucket{le="4.0"}') == batches
        assert wait_until_steady(w, "roundtrip_admitted_bytes", 1.0) == 0
        assert w.metric("roundtrip_computing_bytes") == 0
