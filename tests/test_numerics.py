"""The same bits from every pod: a worker's numerics identity, the xla_cpu_max_isa pin, and
calls that insist on a fingerprint.

The eager reference is run in its own process under the same ``XLA_FLAGS`` as the worker it
is compared with: XLA reads its flags once, when JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from roundtrip.client import FailedPreconditionError, RoundTripClient, RoundTripResult
from roundtrip.server.numerics import numerics
from roundtrip.wire.metadata import FINGERPRINT_KEY
from support.workers import ROOT, WorkerProcess

#: The issue's case: seed 5, x of shape (3, 2, 4) from a normal, features 2. This x gives
#: different bits under AVX and AVX2 (the test checks that it does).
SEED, FEATURES = 5, 2
X = np.random.default_rng(1).normal(size=(3, 2, 4)).astype(np.float32)
HOST_LEVELS = numerics.supported_levels(numerics.cpu_flags() or frozenset())
needs_avx2 = pytest.mark.skipif("AVX2" not in HOST_LEVELS, reason="needs an AVX2 x86 CPU")

pytestmark = pytest.mark.slow


def reference_bits(isa: str) -> list[int]:
    """The eager reference's three numbers (as int64 bit patterns), in a fresh process
    with ``--xla_cpu_max_isa=isa``."""
    code = (
        "import json, sys, numpy as np\n"
        "from reference import reference\n"
        "x = np.asarray(json.loads(sys.argv[1]), np.float32)\n"
        f"print(json.dumps(reference({SEED}, x, {FEATURES}).view(np.int64).tolist()))\n"
    )
    env = {**os.environ, "XLA_FLAGS": f"--xla_cpu_max_isa={isa}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(X.tolist())],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT / "tests",
        check=True,
    )
    return list(json.loads(done.stdout))


def answer_bits(worker: WorkerProcess) -> list[int]:
    with RoundTripClient(worker.target) as client:
        result = client.round_trip(SEED, X, FEATURES)
    return list(np.array(result.as_list(), np.float64).view(np.int64).tolist())


@pytest.fixture(scope="module")
def pinned() -> Iterator[dict[str, list[WorkerProcess]]]:
    """Two workers pinned to AVX and one to AVX2, all at once."""
    flags = ("--warmup-shapes", "3:4", "--audit-fraction", "0")
    workers = {
        "AVX": [WorkerProcess(*flags, "--xla-cpu-max-isa", "AVX") for _ in range(2)],
        "AVX2": [WorkerProcess(*flags, "--xla-cpu-max-isa", "avx2")],  # any case
    }
    try:
        for group in workers.values():
            for worker in group:
                worker.wait_serving()
        yield workers
    finally:
        for group in workers.values():
            for worker in group:
                worker.kill()


def identity(worker: WorkerProcess) -> dict[str, str]:
    with RoundTripClient(worker.target) as client:
        numerics_ = client.server_info().numerics
    return {
        "backend": numerics_.backend,
        "device_kind": numerics_.device_kind,
        "xla_cpu_max_isa": numerics_.xla_cpu_max_isa,
        "host_cpu_isa": numerics_.host_cpu_isa,
        "xla_flags": numerics_.xla_flags,
        "fingerprint": numerics_.fingerprint,
    }


@needs_avx2
def test_pinned_workers_answer_with_the_bits_of_the_reference_under_their_pin(
    pinned: dict[str, list[WorkerProcess]],
) -> None:
    avx, avx2 = reference_bits("AVX"), reference_bits("AVX2")
    assert avx != avx2, "this case no longer tells AVX from AVX2 code: pick another x"
    assert answer_bits(pinned["AVX"][0]) == avx
    assert answer_bits(pinned["AVX"][1]) == avx
    assert answer_bits(pinned["AVX2"][0]) == avx2


@needs_avx2
def test_the_fingerprint_tells_pins_apart_and_same_pins_together(
    pinned: dict[str, list[WorkerProcess]],
) -> None:
    first, second = (identity(worker) for worker in pinned["AVX"])
    other = identity(pinned["AVX2"][0])
    assert first["fingerprint"] == second["fingerprint"]
    assert first["fingerprint"] != other["fingerprint"]
    assert len(first["fingerprint"]) == 16
    assert (first["xla_cpu_max_isa"], other["xla_cpu_max_isa"]) == ("AVX", "AVX2")
    assert first["xla_flags"] == "--xla_cpu_max_isa=AVX"
    assert first["backend"] == "cpu"
    assert first["host_cpu_isa"] == HOST_LEVELS[-1]
    # the start log and the metric carry the same identity
    [serving] = [e for e in pinned["AVX"][0].events if e.get("event") == "serving"]
    assert serving["numerics"]["fingerprint"] == first["fingerprint"]
    sample = (
        f'roundtrip_numerics_info{{backend="cpu",device_kind="{first["device_kind"]}",'
        f'fingerprint="{first["fingerprint"]}",host_cpu_isa="{first["host_cpu_isa"]}",'
        'xla_cpu_max_isa="AVX"} 1.0'
    )
    assert sample in pinned["AVX"][0].scrape()


def test_a_worker_without_a_pin_reports_xlas_choice(worker: WorkerProcess) -> None:
    found = identity(worker)
    assert found["xla_cpu_max_isa"] == ""
    assert len(found["fingerprint"]) == 16


# -- calls that insist on a fingerprint ---------------------------------------------------


def test_a_call_insisting_on_the_workers_fingerprint_is_answered(worker: WorkerProcess) -> None:
    fingerprint = identity(worker)["fingerprint"]
    with RoundTripClient(worker.target, expect_fingerprint=fingerprint) as client:
        assert client.round_trip(0, [1.0, 2.0, 3.0], 4).orig_sum == pytest.approx(-4.2219334)
        outcomes = client.round_trip_many([(0, [1.0, 2.0, 3.0], 4)] * 2)
        assert all(isinstance(outcome, RoundTripResult) for outcome in outcomes)
        assert len(list(client.stream([(0, [1.0, 2.0, 3.0], 4)] * 3))) == 3


def test_a_call_insisting_on_another_fingerprint_is_failed_precondition(
    worker: WorkerProcess,
) -> None:
    actual = identity(worker)["fingerprint"]
    wanted = "0123456789abcdef"
    with RoundTripClient(worker.target, expect_fingerprint=wanted) as client:
        for call in (
            lambda: client.round_trip(0, [1.0, 2.0, 3.0], 4),
            lambda: client.round_trip_many([(0, [1.0, 2.0, 3.0], 4)]),
            lambda: list(client.stream([(0, [1.0, 2.0, 3.0], 4)])),
        ):
            with pytest.raises(FailedPreconditionError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert actual in str(caught.value)
            assert wanted in str(caught.value)
        # how a caller learns the fingerprint is never refused
        assert client.server_info().numerics.fingerprint == actual
    assert (
        worker.metric('roundtrip_requests_total{code="FAILED_PRECONDITION",method="RoundTrip"}')
        >= 1
    )


def test_v2_calls_insist_the_same_way(worker: WorkerProcess) -> None:
    from test_v2 import http, infer, infer_request, json_infer

    actual = identity(worker)["fingerprint"]
    request = infer_request([0], np.arange(1, 4, dtype=np.float32), [4])
    assert infer(worker, request, metadata=[(FINGERPRINT_KEY, actual)]).outputs[0].name == "result"
    with pytest.raises(grpc.RpcError) as caught:
        infer(worker, request, metadata=[(FINGERPRINT_KEY, "feedfacefeedface")])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    body = json_infer([0], np.arange(1, 4, dtype=np.float32), [4])
    path = "/v2/models/roundtrip/infer"
    assert http(worker, path, body, {FINGERPRINT_KEY: actual})[0] == 200
    status, _, answer = http(worker, path, body, {FINGERPRINT_KEY: "feedfacefeedface"})
    assert status == 400  # FAILED_PRECONDITION, as Google's mapping has it
    assert actual in json.loads(answer)["error"]


# -- the pin's refusals --------------------------------------------------------------------


def start_exit(*flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "roundtrip.server", "--port", "0", *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        timeout=60,
    )
    return done.returncode, done.stderr


def test_a_level_xla_does_not_know_stops_the_worker() -> None:
    code, stderr = start_exit("--xla-cpu-max-isa", "AVX3")
    assert code == 2
    assert "'AVX3' is not a level XLA knows" in stderr


def test_a_level_beyond_this_cpu_stops_the_worker() -> None:
    beyond = [level for level in numerics.ISA_LEVELS if level not in HOST_LEVELS]
    if not beyond:
        pytest.skip("this CPU runs every level")
    code, stderr = start_exit("--xla-cpu-max-isa", beyond[-1])
    assert code == 2
    assert f"xla_cpu_max_isa={beyond[-1]} is beyond this CPU" in stderr


@needs_avx2
def test_xla_flags_pinning_another_level_stops_the_worker() -> None:
    code, stderr = start_exit(
        "--xla-cpu-max-isa", "AVX2", env={"XLA_FLAGS": "--xla_cpu_max_isa=AVX"}
    )
    assert code == 2
    assert "XLA_FLAGS already sets --xla_cpu_max_isa=AVX" in stderr


def test_the_levels_are_the_ones_this_xla_documents() -> None:
    """The list the worker checks against is the one in the installed XLA's own flag help."""
    import jaxlib

    help_text = b""
    for library in sorted(Path(jaxlib.__file__).parent.glob("*.so")):
        data = library.read_bytes()
        start = data.find(b"Maximum ISA that XLA:CPU")
        if start >= 0:
            help_text = data[start : start + 400]
            break
    assert help_text, "the installed jaxlib no longer documents --xla_cpu_max_isa"
    for level in numerics.ISA_LEVELS:
        assert level.encode() in help_text, level


def test_before_its_fingerprint_is_known_an_insisting_call_is_unavailable() -> None:
    """During warm-up, a call that insists on a fingerprint cannot be checked yet."""
    from roundtrip.v1 import roundtrip_pb2 as pb
    from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

    process = WorkerProcess("--warmup-shapes", "3:4,64:64,128:128,256:256")
    try:
        request = pb.RoundTripRequest(seed=0, x=pb.Array(values=[1, 2, 3]), features=4)
        with grpc.insecure_channel(process.target) as channel:
            stub = pb_grpc.RoundTripServiceStub(channel)  # no client retries here
            with pytest.raises(grpc.RpcError) as caught:
                stub.RoundTrip(request, timeout=30, metadata=((FINGERPRINT_KEY, "0" * 16),))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not computed its numerics fingerprint yet" in (caught.value.details() or "")
            process.wait_serving()
            assert stub.RoundTrip(request, timeout=30).orig_sum  # known now: no check asked
    finally:
        process.kill()


LANES_DISAGREE = """
import asyncio, sys
from roundtrip.server import app
from roundtrip.server.engine import warmup
from roundtrip.server.config import WorkerConfig

warmup.fingerprint = lambda engine, stop=None: str(engine.device)  # as if each lane gave other bits

async def main():
    worker = await app.start(WorkerConfig.from_sources(
        ["--port", "0", "--metrics-port", "0", "--http-port", "-1", "--warmup-shapes", "3:4",
         "--max-batch-size", "2"],
        {}))
    try:
        await worker.warm_up()
    except warmup.SelfCheckFailed as error:
        print(error)
        sys.exit(3)
    sys.exit(0)

asyncio.run(main())
"""


def test_lanes_that_disagree_never_serve() -> None:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    done = subprocess.run(
        [sys.executable, "-c", LANES_DISAGREE],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "the compute lanes give different bits" in done.stdout


def test_the_async_client_insists_the_same_way(worker: WorkerProcess) -> None:
    import asyncio

    from roundtrip.client import AsyncRoundTripClient

    actual = identity(worker)["fingerprint"]

    async def calls() -> None:
        async with AsyncRoundTripClient(worker.target, expect_fingerprint=actual) as client:
            assert (await client.round_trip(0, [1.0, 2.0, 3.0], 4)).max_abs_diff == 0.0
        async with AsyncRoundTripClient(worker.target, expect_fingerprint="f" * 16) as client:
            with pytest.raises(FailedPreconditionError):
                await client.round_trip(0, [1.0, 2.0, 3.0], 4)

    asyncio.run(calls())
