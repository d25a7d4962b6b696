"""The thin client: no JAX, the CLI, argument coercion, the error hierarchy."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import WorkerProcess, console_script

from roundtrip.client import errors
from roundtrip.client.messages import as_int64, build_request
from roundtrip.client.sync import InOrder

CLI = console_script("roundtrip")


def test_client_import_does_not_pull_in_jax() -> None:
    code = (
        "import sys, roundtrip.client, roundtrip.client.cli; "
        "bad = [m for m in ('jax', 'jaxlib', 'flax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def cli(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``roundtrip`` CLI against ``worker``."""
    return subprocess.run(
        [CLI, "--target", worker.target, *args], capture_output=True, text=True, check=False
    )


def test_cli_call_prints_the_worked_example(worker: WorkerProcess) -> None:
    done = cli(worker, "call", "--seed", "0", "--x", "1,2,3", "--features", "4")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "orig_sum": -4.221933364868164,
        "merged_sum": -4.221933364868164,
        "max_abs_diff": 0.0,
    }


def test_cli_refused_call_exits_one_with_the_status(worker: WorkerProcess) -> None:
    done = cli(worker, "call", "--seed", "0", "--x", "1,2,3", "--features", "0")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: features must be >= 1" in done.stderr


def test_cli_info_prints_versions(worker: WorkerProcess) -> None:
    done = cli(worker, "info")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["jaxVersion"] == "0.10.2"


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
    assert request.x.raw == np.float32([1, 2, 3]).tobytes()
    assert not request.x.values


def test_errors_keep_their_status_code() -> None:
    error = errors.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert isinstance(error, errors.ResourceExhaustedError)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(error) == "RESOURCE_EXHAUSTED: queue full"
    assert errors.from_rpc_code(3, "x").code == grpc.StatusCode.INVALID_ARGUMENT
    assert type(errors.from_status(grpc.StatusCode.ABORTED, "x")) is errors.RoundTripError


def test_in_order_releases_answers_by_id() -> None:
    order = InOrder()
    assert order.push(1, errors.RoundTripError("b")) == []
    released = order.push(0, errors.RoundTripError("a"))
    assert [str(e.message) for e in released] == ["a", "b"]  # type: ignore[union-attr]
