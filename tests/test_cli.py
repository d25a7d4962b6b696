"""The ``roundtrip`` command: options where people put them, float32 answers, exit codes."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

from roundtrip.client import RoundTripClient
from roundtrip.client.cli import result_json
from support.workers import WorkerProcess, console_script, free_port, serving_process

CLI = console_script("roundtrip")
WORKED_EXAMPLE = '{"orig_sum": -4.2219334, "merged_sum": -4.2219334, "max_abs_diff": 0.0}'


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, check=False, env=env)


def test_call_prints_the_worked_example_in_float32_form(worker: WorkerProcess) -> None:
    done = run("call", "--seed", "0", "--x", "1,2,3", "--features", "4", "--target", worker.target)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == WORKED_EXAMPLE


def test_global_options_go_before_the_command_too(worker: WorkerProcess) -> None:
    done = run("--target", worker.target, "call", "--seed", "0", "--x", "1,2,3", "--features", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == WORKED_EXAMPLE


def test_the_target_comes_from_the_environment(worker: WorkerProcess) -> None:
    import os

    env = {**os.environ, "ROUNDTRIP_TARGET": worker.target}
    done = run("call", "--seed", "0", "--x", "1,2,3", "--features", "4", env=env)
    assert done.stdout.strip() == WORKED_EXAMPLE, done.stderr


def test_negative_values_in_x_are_numbers(worker: WorkerProcess) -> None:
    done = run(
        "call", "--seed", "3", "--x", "-1,2,-3.5", "--features", "2", "--target", worker.target
    )
    assert done.returncode == 0, done.stderr
    with RoundTripClient(worker.target) as client:
        expected = client.round_trip(3, [-1.0, 2.0, -3.5], 2)
    printed = json.loads(done.stdout)
    assert np.float32(printed["orig_sum"]) == np.float32(expected.orig_sum)
    assert printed["orig_sum"] == float(str(np.float32(expected.orig_sum)))


def test_outputs_print_in_their_dtype_shortest_form(worker: WorkerProcess) -> None:
    done = run(
        "call",
        "--seed",
        "0",
        "--x",
        "1,2,3",
        "--features",
        "4",
        "--outputs",
        "--target",
        worker.target,
    )
    printed = json.loads(done.stdout)
    with RoundTripClient(worker.target) as client:
        expected = client.round_trip(0, [1.0, 2.0, 3.0], 4, return_outputs=True)
    assert expected.orig_out is not None
    assert np.array_equal(np.float32(printed["orig_out"]), expected.orig_out)
    assert all(len(repr(value)) <= 12 for value in printed["orig_out"])  # not 17 digits


def test_info_uses_the_same_snake_case_as_call(worker: WorkerProcess) -> None:
    done = run("info", "--target", worker.target)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["jax_version"] == "0.10.2"
    assert "max_inflight_bytes" in info["limits"]


def test_info_prints_numbers_as_numbers_and_every_field(worker: WorkerProcess) -> None:
    done = run("info", "--target", worker.target)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    limits = info["limits"]
    assert isinstance(limits["max_batch_items"], int)  # int64: a string in proto3's JSON
    assert isinstance(limits["max_queue_delay_us"], int)
    assert info["x64_enabled"] is False  # a false field is printed, not left out


def test_many_sends_more_than_a_call_may_hold_in_several_calls() -> None:
    with serving_process("--warmup-shapes", "3:4", "--max-batch-items", "4") as small:
        lines = "".join(
            f'{{"seed": {seed}, "x": [1, 2, 3], "features": 4}}\n' for seed in range(10)
        )
        done = subprocess.run(
            [CLI, "many", "--target", small.target],
            input=lines,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        with RoundTripClient(small.target) as client:
            expected = [client.round_trip(seed, [1.0, 2.0, 3.0], 4) for seed in range(10)]
        answered = small.metric('roundtrip_requests_total{code="OK",method="RoundTripBatch"}')
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert answers == [result_json(result) for result in expected]  # in order, each exact
    assert answered == 10  # all by RoundTripBatch, none refused


def test_a_refused_call_exits_one_with_the_status(worker: WorkerProcess) -> None:
    done = run("call", "--seed", "0", "--x", "1,2,3", "--features", "0", "--target", worker.target)
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: features must be >= 1" in done.stderr


def test_an_unreachable_worker_is_a_clean_exit_two() -> None:
    target = f"127.0.0.1:{free_port()}"
    done = run("call", "--seed", "0", "--x", "1", "--features", "1", "--target", target)
    assert done.returncode == 2
    assert done.stderr.startswith(f"roundtrip: no serving worker reachable at {target}")
    assert "Traceback" not in done.stderr


def test_an_unreadable_token_file_is_a_clean_exit_two(worker: WorkerProcess) -> None:
    done = run("info", "--target", worker.target, "--token-file", "/nonexistent/token")
    assert done.returncode == 2
    assert "No such file" in done.stderr
    assert "Traceback" not in done.stderr


def test_ready_says_whether_a_worker_is_serving(worker: WorkerProcess) -> None:
    done = run("ready", "--target", worker.target)
    assert (done.returncode, json.loads(done.stdout)["serving"]) == (0, True)
    done = run("ready", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert (done.returncode, json.loads(done.stdout)["serving"]) == (2, False)  # not 1: no one
    assert "nothing accepts connections" in done.stderr


@pytest.mark.parametrize("port", ["http_port", "metrics_port"])
def test_ready_names_an_http1_port_at_once_instead_of_waiting(
    worker: WorkerProcess, port: str
) -> None:
    """The REST or metrics port given for the gRPC one: 2 at once, even with --wait 120."""
    target = f"127.0.0.1:{getattr(worker, port)}"
    started = time.monotonic()
    done = run("ready", "--target", target, "--wait", "120", "--timeout", "5")
    assert (done.returncode, json.loads(done.stdout)["serving"]) == (2, False)
    assert f"{target} speaks HTTP/1, not gRPC" in done.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    "command", [["info"], ["call", "--seed", "0", "--x", "1", "--features", "1"], ["many"]]
)
def test_calls_that_end_unavailable_say_why(worker: WorkerProcess, command: list[str]) -> None:
    target = f"127.0.0.1:{worker.http_port}"
    done = subprocess.run(
        [CLI, *command, "--target", target, "--timeout", "5"],
        input='{"seed": 0, "x": [1], "features": 1}\n',
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"roundtrip: no serving worker reachable at {target}: ")
    assert "speaks HTTP/1, not gRPC" in done.stderr


def test_ready_waits_for_a_port_nothing_listens_on_yet_then_says_so() -> None:
    """A worker that is starting binds its port late: --wait waits, then names the cause."""
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run("ready", "--target", target, "--wait", "3", "--timeout", "2")
    assert (done.returncode, json.loads(done.stdout)["serving"]) == (2, False)
    assert "nothing accepts connections" in done.stderr
    assert time.monotonic() - started >= 3


def test_ready_while_warming_up_is_one_not_two() -> None:
    """A wait loop tells "not yet" (1) from "never, as configured" (2)."""
    worker = WorkerProcess("--warmup-shapes", ",".join(f"{w}:{w + 1}" for w in range(2, 30)))
    try:
        done = run("ready", "--target", worker.target, "--timeout", "2")
        assert (done.returncode, json.loads(done.stdout)["serving"]) == (1, False), done.stderr
    finally:
        worker.kill()


def test_version() -> None:
    from roundtrip.wire.version import __version__

    done = run("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"roundtrip {__version__}")


@pytest.mark.parametrize("args", [["call", "--seed", "0"], ["frobnicate"], []])
def test_usage_errors_exit_two(args: list[str]) -> None:
    assert run(*args).returncode == 2
