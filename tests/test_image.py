"""The image, run as a pod runs it: read-only, uid 10001, SERVING, exact, and drained by a stop.

Needs a built image and podman: ``make image-test`` builds one and runs these
with ``ROUNDTRIP_IMAGE`` set; without it they are skipped (``make test`` runs
``make image-test`` itself, see the Makefile).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from reference import reference

from roundtrip.client import RoundTripClient, RoundTripError
from support.polling import wait_for
from support.workers import WorkerProcess

IMAGE = os.environ.get("ROUNDTRIP_IMAGE", "")
PODMAN = ["podman", "--runtime", "runc"]
pytestmark = [
    pytest.mark.skipif(not IMAGE, reason="needs ROUNDTRIP_IMAGE: run make image-test"),
    pytest.mark.slow,
    pytest.mark.external,
]
CASE = (11, np.linspace(-1, 1, 64, dtype=np.float32), 64)


@pytest.fixture(scope="module")
def container() -> Iterator[tuple[WorkerProcess, str]]:
    """The image run read-only on the host network, ports picked by the worker and logged."""
    name = f"roundtrip-test-{uuid.uuid4().hex[:8]}"
    command = [
        *PODMAN,
        "run",
        "--rm",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--network",
        "host",
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
        "-e",
        "ROUNDTRIP_HOST=127.0.0.1",
        "-e",
        "ROUNDTRIP_PORT=0",
        "-e",
        "ROUNDTRIP_METRICS_PORT=0",
        "-e",
        "ROUNDTRIP_HTTP_PORT=0",
        "-e",
        "ROUNDTRIP_WARMUP_SHAPES=64:64",
        IMAGE,
    ]
    worker = WorkerProcess(command=command)
    try:
        worker.wait_serving()
        yield worker, name
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)
        worker.kill()


def run_in(name: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, "exec", name, *command], capture_output=True, text=True)


def test_the_image_runs_as_uid_10001_on_a_read_only_root(
    container: tuple[WorkerProcess, str],
) -> None:
    _, name = container
    assert run_in(name, "id", "-u").stdout.strip() == "10001"
    assert run_in(name, "touch", "/app/written").returncode != 0


def test_the_image_answers_exactly(container: tuple[WorkerProcess, str]) -> None:
    worker, _ = container
    with RoundTripClient(worker.target, timeout=60) as client:
        assert np.array_equal(client.round_trip(*CASE).as_list(), reference(*CASE))
        assert client.round_trip(0, [1.0, 2.0, 3.0], 4).as_list() == [
            -4.221933364868164,
            -4.221933364868164,
            0.0,
        ]


def test_the_image_runs_the_worker_on_uvloop(container: tuple[WorkerProcess, str]) -> None:
    worker, _ = container  # the image's lock installs uvloop: the default loop is there
    [starting] = [e for e in worker.events if e.get("event") == "starting"]
    assert starting["event_loop"] == "uvloop"


def test_the_image_serves_v2_rest(container: tuple[WorkerProcess, str]) -> None:
    worker, _ = container
    body = {
        "inputs": [
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [0]},
            {"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]},
            {"name": "features", "datatype": "INT64", "shape": [1], "data": [4]},
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{worker.http_port}/v2/models/roundtrip/infer",
        data=json.dumps(body).encode(),
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        [result] = json.loads(response.read())["outputs"]
    assert result["data"] == [-4.221933364868164, -4.221933364868164, 0.0]


def test_podman_stop_under_load_loses_nothing(container: tuple[WorkerProcess, str]) -> None:
    """Last in this file: it stops the container the tests above share."""
    worker, name = container
    expected = reference(*CASE)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def caller() -> None:
        with RoundTripClient(worker.target, timeout=60) as client:
            while True:
                try:
                    good = np.array_equal(client.round_trip(*CASE).as_list(), expected)
                    outcome = "ok" if good else "wrong"
                except RoundTripError as error:
                    outcome = error.code.name
                with lock:
                    outcomes[outcome] += 1
                if outcome != "ok":
                    return

    # every method's OK answers so far (the stop log's count covers them all)
    answered_before = sum(
        float(value)
        for value in re.findall(
            r'^roundtrip_requests_total\{code="OK",method="[^"]+"\} (\S+)$',
            worker.scrape(),
            flags=re.MULTILINE,
        )
    )
    callers = [threading.Thread(target=caller) for _ in range(8)]
    for thread in callers:
        thread.start()
    wait_for(lambda: outcomes["ok"] > 50, "answers before the stop", timeout=60)
    stopped = subprocess.run([*PODMAN, "stop", "-t", "60", name], capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr
    for thread in callers:
        thread.join(60)
    assert worker.process.wait(60) == 0
    assert outcomes["ok"] > 50
    assert set(outcomes) <= {"ok", "UNAVAILABLE"}, outcomes
    [event] = [e for e in worker.events if e.get("event") == "stopped"]
    answered: dict[str, int] = event["answered_by_code"]
    assert answered["OK"] - answered_before == outcomes["ok"], (answered, outcomes)
    assert set(answered) <= {"OK", "UNAVAILABLE"}, answered
