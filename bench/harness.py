"""The benchmark harness: the servers, the loads, the reference check of every answer.

Every benchmark here (``make bench``'s scenarios, and the soak, overload, memory-bounds
and accelerator runs) starts its servers and drives them through these functions:

* **servers** (:func:`launched`): the worker (``roundtrip-server``, through
  ``support.workers``, the tests' own launcher; from another commit's tree with
  :func:`worktree`), the empty grpc.aio handler and the naive eager server
  (``bench/servers.py``), and MLServer from its own environment (``bench/mlserver``);
* **loads**: h2load replaying one body over gRPC or HTTP (:func:`h2load`), Triton's
  perf_analyzer over V2 (:func:`perf_analyzer`), and asyncio callers through grpc.aio
  (:func:`callers`, :func:`fresh_seed_callers`, :func:`stream_load`);
* **checks**: the eager reference computed here for every body (:class:`Body`), each
  body's answer compared bit for bit before its load (h2load counts an HTTP 200 that
  carries a gRPC error as a success), every answer of the asyncio loads compared as it
  comes, and the worker's own counters read around each load (:func:`codes`).

>>> same((1.0, 1.0, 0.0), (1.0, 1.0, 0.0)), same((0.0, 0.0, 0.0), (-0.0, 0.0, 0.0))
(True, False)
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from roundtrip.client.messages import build_request
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.workers import (
    ROOT,
    ServerProcess,
    WorkerProcess,
    free_port,
    metric_value,
    metrics_page,
)

OUT = ROOT / "docs" / "bench"
ROUNDTRIP = "/roundtrip.v1.RoundTripService/RoundTrip"
ROUNDTRIP_BATCH = "/roundtrip.v1.RoundTripService/RoundTripBatch"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
INFER_PATH = "/v2/models/roundtrip/infer"
#: Triton's perf_analyzer and the libraries it loads (``make .tools/perf/.synced``).
PERF = ROOT / ".tools" / "perf"
#: (width, features) of the workloads: the worked example, a small layer, a wide one.
WORKLOADS = {"W1": (3, 4), "W2": (64, 64), "W3": (1024, 1024)}

Answer = tuple[float, float, float]


def reference(seed: int, x: Any, features: int) -> Answer:
    """SPEC.md's eager steps, run here on this process's backend."""
    from roundtrip.server.reference import eager_round_trip

    result = eager_round_trip(seed, x, features)
    return (result.orig_sum, result.merged_sum, result.max_abs_diff)


def same(got: Sequence[float], want: Sequence[float]) -> bool:
    """The three numbers bit for bit (0.0 is not -0.0; NaN matches NaN): the worker's own
    comparison, which its self-check and audit use."""
    from roundtrip.server.reference import same_answer
    from roundtrip.server.values import RoundTripAnswer

    return same_answer(RoundTripAnswer(*got), RoundTripAnswer(*want))


def answer_of(response: pb.RoundTripResponse) -> Answer:
    return (response.orig_sum, response.merged_sum, response.max_abs_diff)


@dataclass
class Body:
    """One request of a workload, with its answer from the eager reference, in every
    encoding a scenario sends it in."""

    seed: int
    x: np.ndarray
    features: int
    expected: Answer = field(init=False)

    def __post_init__(self) -> None:
        self.expected = reference(self.seed, self.x, self.features)

    @cached_property
    def request(self) -> pb.RoundTripRequest:
        return build_request(self.seed, self.x, self.features)

    @cached_property
    def v2(self) -> v2pb.ModelInferRequest:
        request = v2pb.ModelInferRequest(model_name="roundtrip")
        for name, datatype, data in (
            ("seed", "INT64", np.array([self.seed], "<i8")),
            ("x", "FP32", self.x.astype("<f4")),
            ("features", "INT64", np.array([self.features], "<i8")),
        ):
            request.inputs.add(name=name, datatype=datatype, shape=data.shape)
            request.raw_input_contents.append(data.tobytes())
        return request

    @cached_property
    def json(self) -> bytes:
        tensors = [
            ("seed", "INT64", [1], [self.seed]),
            ("x", "FP32", list(self.x.shape), self.x.ravel().tolist()),
            ("features", "INT64", [1], [self.features]),
        ]
        inputs = [
            {"name": name, "datatype": datatype, "shape": shape, "data": data}
            for name, datatype, shape, data in tensors
        ]
        return json.dumps({"inputs": inputs}).encode()


def workload_body(workload: str, index: int = 0) -> Body:
    """Request ``index`` of ``workload`` (W1's first is the worked example)."""
    width, features = WORKLOADS[workload]
    rng = np.random.default_rng(width * 7 + features + index)
    if workload == "W1" and index == 0:
        x = np.array([1.0, 2.0, 3.0], np.float32)
    else:
        x = rng.standard_normal(width).astype(np.float32)
    return Body(int(rng.integers(-(2**63), 2**63 - 1)), x, features)


@dataclass
class BatchBody:
    """One RoundTripBatch message of ``count`` requests of a workload, each its own seed."""

    workload: str
    count: int = 64
    items: list[Body] = field(init=False)

    def __post_init__(self) -> None:
        width, features = WORKLOADS[self.workload]
        rng = np.random.default_rng(self.count)
        x = rng.standard_normal(width).astype(np.float32)
        seeds = [int(s) for s in rng.integers(-(2**31), 2**31, self.count)]
        self.items = [Body(seed, x, features) for seed in seeds]

    @cached_property
    def request(self) -> pb.RoundTripBatchRequest:
        return pb.RoundTripBatchRequest(requests=[item.request for item in self.items])


# --- servers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """A server a benchmark starts: ``kind`` is ``worker``, ``empty``, ``naive`` or
    ``mlserver``; a worker takes ``flags`` and ``env``, and ``tree`` (a checkout of
    another commit) runs that commit's worker instead of this one."""

    name: str
    kind: str
    flags: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    tree: Path | None = None

    @property
    def computes(self) -> bool:
        """Whether its answers are the computation's (the empty handler's are a constant)."""
        return self.kind != "empty"


@dataclass
class Launched:
    """A running server's ports (``metrics_port`` 0: not the worker) and process."""

    port: int
    http_port: int = 0
    metrics_port: int = 0
    process: ServerProcess | None = None

    def scrape(self) -> str:
        return metrics_page(self.metrics_port) if self.metrics_port else ""


@contextmanager
def launched(spec: ServerSpec) -> Iterator[Launched]:
    """``spec`` started on free ports, yielded once it serves; stopped on leaving."""
    if spec.kind == "mlserver":
        with mlserver() as (grpc_port, http_port):
            yield Launched(grpc_port, http_port)
        return
    process: ServerProcess
    if spec.kind == "worker":
        env = dict(spec.env)
        cwd = ROOT
        if spec.tree is not None:
            cwd = spec.tree
            env["PYTHONPATH"] = f"{spec.tree / 'client'}{os.pathsep}{spec.tree / 'server'}"
        process = WorkerProcess(*spec.flags, env=env, cwd=cwd)
    else:
        process = ServerProcess(
            [sys.executable, "-m", "bench.servers", spec.kind, *spec.flags], env=spec.env
        )
    try:
        if spec.kind == "worker":
            process.wait_serving(1200)
        yield Launched(process.port, process.http_port, process.metrics_port, process)
    finally:
        process.terminate(120)
        process.kill()


@contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """A checkout of ``commit`` in a temporary ``git worktree``, removed on leaving."""
    folder = Path(tempfile.mkdtemp(prefix="roundtrip-baseline-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), commit],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, capture_output=True
        )
        shutil.rmtree(folder, ignore_errors=True)


MLSERVER_ENV = ROOT / ".tools" / "mlserver"
MLSERVER_LOCK = ROOT / "bench" / "mlserver" / "requirements.txt"


def mlserver_executable() -> Path:
    """MLServer's environment, installed from its lock on first use."""
    marker = MLSERVER_ENV / ".synced"
    if not marker.exists() or marker.stat().st_mtime < MLSERVER_LOCK.stat().st_mtime:
        uv = ROOT / ".tools" / "bin" / "uv"
        subprocess.run(
            [str(uv), "venv", "--quiet", "--allow-existing", str(MLSERVER_ENV)], check=True
        )
        python = str(MLSERVER_ENV / "bin" / "python")
        install = [str(uv), "pip", "install", "--quiet", "--python", python]
        subprocess.run([*install, "--require-hashes", "-r", str(MLSERVER_LOCK)], check=True)
        marker.touch()
    return MLSERVER_ENV / "bin" / "mlserver"


@contextmanager
def mlserver() -> Iterator[tuple[int, int]]:
    """MLServer 1.7 serving the same computation (``bench/mlserver/runtime.py``, jitted,
    ``parallel_workers: 0`` so it computes in its server process as the worker does);
    yields (grpc_port, http_port) once its model is ready."""
    executable = mlserver_executable()
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="mlserver-"))
    settings = {"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port}
    settings |= {"metrics_port": metrics_port, "parallel_workers": 0}
    (folder / "settings.json").write_text(json.dumps(settings))
    model = {"name": "roundtrip", "implementation": "runtime.RoundTripRuntime"}
    model["parameters"] = {"extra": {"mode": "jit"}}  # type: ignore[assignment]
    (folder / "model-settings.json").write_text(json.dumps(model))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench" / "mlserver"), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [str(executable), "start", str(folder)],
        env=env,
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        url = f"http://127.0.0.1:{http_port}/v2/models/roundtrip/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("MLServer did not get ready")
            time.sleep(0.5)
        yield grpc_port, http_port
    finally:
        process.terminate()
        process.wait(60)
        shutil.rmtree(folder, ignore_errors=True)


# --- checks --------------------------------------------------------------------------------


class Mismatch(AssertionError):
    """An answer that differs from the eager reference: the run is worthless."""


def check_unary(port: int, body: Body) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = pb_grpc.RoundTripServiceStub(channel).RoundTrip(body.request, timeout=120)
    if not same(answer_of(response), body.expected):
        raise Mismatch(f"RoundTrip answered {answer_of(response)}, expected {body.expected}")


def check_batch(port: int, batch: BatchBody) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)
        response = stub.RoundTripBatch(batch.request, timeout=120)
    for outcome, item in zip(response.outcomes, batch.items, strict=True):
        if outcome.HasField("error") or not same(answer_of(outcome.response), item.expected):
            raise Mismatch(f"a RoundTripBatch outcome differs from the reference: {outcome}")


def check_v2(port: int, body: Body) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(
            MODEL_INFER,
            request_serializer=v2pb.ModelInferRequest.SerializeToString,
            response_deserializer=v2pb.ModelInferResponse.FromString,
        )
        response = infer(body.v2, timeout=120)
    if response.raw_output_contents:
        got = np.frombuffer(response.raw_output_contents[0], "<f4")
    else:
        got = np.asarray(response.outputs[0].contents.fp32_contents, np.float32)
    if not same(tuple(float(v) for v in got), body.expected):
        raise Mismatch(f"V2 gRPC answered {got.tolist()}, expected {body.expected}")


def check_json(http_port: int, body: Body) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}{INFER_PATH}", body.json)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=120) as response:
        [tensor] = json.loads(response.read())["outputs"]
    got = tuple(float(np.float32(v)) for v in np.asarray(tensor["data"]).ravel())
    if not same(got, body.expected):
        raise Mismatch(f"V2 REST answered {got}, expected {body.expected}")


def codes(launched: Launched) -> Counter[str]:
    """The worker's answers so far by status code, over every method (empty: not a worker)."""
    counts: Counter[str] = Counter()
    for match in re.finditer(
        r'^roundtrip_requests_total\{code="(\w+)",method="\w+"\} (\S+)$',
        launched.scrape(),
        flags=re.MULTILINE,
    ):
        counts[match.group(1)] += int(float(match.group(2)))
    return counts


def settled(launched: Launched, timeout_s: float = 60.0) -> None:
    """Wait until the worker holds no call and no queued request: a load's last calls (a
    batch call's items, say) are counted when they end, which can be after the load
    generator has exited; counted late, they would land in the next load's figures."""
    if not launched.metrics_port:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = metric(launched, "roundtrip_inflight_requests")
        if not busy and not metric(launched, "roundtrip_queued_requests"):
            return
        time.sleep(0.1)


def metric(launched: Launched, sample: str) -> float:
    return metric_value(launched.scrape(), sample, missing=0.0) if launched.metrics_port else 0.0


# --- loads ---------------------------------------------------------------------------------


def grpc_frame(message: Any) -> bytes:
    """A message as one gRPC frame: not compressed, its length, its bytes."""
    data = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def h2load(
    url: str,
    payload: bytes,
    headers: Sequence[str],
    *,
    duration: int,
    clients: int,
    streams: int,
    h1: bool = False,
) -> dict[str, float]:
    """h2load replaying ``payload`` to ``url`` (``h1``: HTTP/1.1) after 2 s of warm-up:
    requests per second, how many succeeded (HTTP-level), the mean latency in ms."""
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as handle:
        handle.write(payload)
    command = ["h2load", "-D", str(duration), "--warm-up-time", "2", "-c", str(clients)]
    command += ["-m", str(streams), "-t", "1", "-d", handle.name, *(["--h1"] if h1 else [])]
    for header in headers:
        command += ["-H", header]
    try:
        output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    succeeded = re.search(r"(\d+) succeeded, (\d+) failed", output)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", output)
    if rps is None or succeeded is None or mean is None:
        raise RuntimeError(f"h2load said:\n{output}")
    return {
        "rps": float(rps.group(1)),
        "succeeded": int(succeeded.group(1)),
        "failed": int(succeeded.group(2)),
        "mean_ms": _ms(mean.group(1)),
    }


def h2load_grpc(
    port: int, method: str, message: Any, *, duration: int, clients: int, streams: int
) -> dict[str, float]:
    """h2load replaying one gRPC call of ``method`` with ``message``."""
    return h2load(
        f"http://127.0.0.1:{port}{method}",
        grpc_frame(message),
        ["content-type: application/grpc", "te: trailers"],
        duration=duration,
        clients=clients,
        streams=streams,
    )


def perf_input_data(body: Body) -> dict[str, Any]:
    """``body`` as perf_analyzer's ``--input-data`` JSON: the same tensors as :attr:`Body.v2`
    (float32 x written as the decimals that read back to the same bits).

    >>> data = perf_input_data(workload_body("W1"))
    >>> data["data"][0]["x"], data["data"][0]["features"]
    ({'content': [1.0, 2.0, 3.0], 'shape': [3]}, [4])
    """
    x = body.x.astype("<f4")
    return {
        "data": [
            {
                "seed": [body.seed],
                "x": {"content": [float(v) for v in x.ravel()], "shape": list(x.shape)},
                "features": [body.features],
            }
        ]
    }


def perf_analyzer(
    port: int, protocol: str, body: Body, *, duration: int, concurrency: int
) -> dict[str, float]:
    """Triton's perf_analyzer sending ``body`` to model ``roundtrip`` over ``protocol``
    (``grpc`` or ``http``) with ``concurrency`` requests outstanding, for three windows of
    a third of ``duration`` each: inferences per second, as it reports them."""
    binary = PERF / "bin" / "perf_analyzer"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: make {PERF.relative_to(ROOT)}/.synced")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(perf_input_data(body), handle)
    command = [str(binary), "-m", "roundtrip", "-u", f"127.0.0.1:{port}", "-i", protocol]
    command += ["--input-data", handle.name, "--concurrency-range", str(concurrency)]
    command += ["--measurement-interval", str(duration * 1000 // 3), "--max-trials", "3"]
    command += ["--stability-percentage", "100000"]  # three windows, however they vary
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, "LD_LIBRARY_PATH": str(PERF / "lib")},
            timeout=60 + 20 * duration,
        )
    finally:
        os.unlink(handle.name)
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", done.stdout)
    if done.returncode or throughput is None:
        raise RuntimeError(f"perf_analyzer said:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return {"rps": float(throughput.group(1))}


def _ms(text: str) -> float:
    """h2load's time (``850us``, ``1.2ms``, ``2s``) in milliseconds.

    >>> _ms("850us"), _ms("1.5ms"), _ms("2s")
    (0.85, 1.5, 2000.0)
    """
    value = float(re.match(r"[\d.]+", text).group(0))  # type: ignore[union-attr]
    if text.endswith("us"):
        return value / 1000
    if text.endswith("ms"):
        return value
    return value * 1000


def callers(
    port: int, bodies: Sequence[Body], *, concurrency: int, duration: float
) -> dict[str, float]:
    """``concurrency`` asyncio callers over 4 channels, cycling through ``bodies`` (a new
    seed and x on every request), every answer compared with the reference."""
    return asyncio.run(_callers(port, bodies, concurrency, duration))


async def _callers(
    port: int, bodies: Sequence[Body], concurrency: int, duration: float
) -> dict[str, float]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(min(concurrency, 4))]
    stubs = [pb_grpc.RoundTripServiceStub(channel) for channel in channels]
    latencies: list[float] = []
    mismatches = errors = 0
    stop = time.monotonic() + duration

    async def caller(number: int) -> None:
        nonlocal mismatches, errors
        stub = stubs[number % len(stubs)]
        index = number
        while time.monotonic() < stop:
            body = bodies[index % len(bodies)]
            index += concurrency
            started = time.perf_counter()
            try:
                response = await stub.RoundTrip(body.request, timeout=120)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            mismatches += not same(answer_of(response), body.expected)

    began = time.perf_counter()
    await asyncio.gather(*(caller(number) for number in range(concurrency)))
    elapsed = time.perf_counter() - began
    for channel in channels:
        await channel.close()
    return {"rps": len(latencies) / elapsed, **percentiles(latencies)} | {
        "mismatches": mismatches,
        "errors": errors,
    }


def fresh_seed_callers(
    port: int,
    workload: str,
    first_seed: int,
    *,
    duration: float,
    concurrency: int = 16,
    sample: int = 24,
) -> dict[str, float]:
    """``concurrency`` callers, every request a seed never sent before (from ``first_seed``
    on); ``sample`` of the answers compared with the reference afterwards."""
    return asyncio.run(_fresh(port, workload, first_seed, duration, concurrency, sample))


async def _fresh(
    port: int, workload: str, first_seed: int, duration: float, concurrency: int, sample: int
) -> dict[str, float]:
    width, features = WORKLOADS[workload]
    x = np.random.default_rng(3).standard_normal(width).astype(np.float32)
    next_seed = first_seed
    answers: list[tuple[int, Answer]] = []
    errors = 0
    stop = time.monotonic() + duration
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)

        async def caller() -> None:
            nonlocal next_seed, errors
            while time.monotonic() < stop:
                seed, next_seed = next_seed, next_seed + 1
                try:
                    response = await stub.RoundTrip(build_request(seed, x, features), timeout=120)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                answers.append((seed, answer_of(response)))

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    checked = random.Random(first_seed).sample(answers, min(sample, len(answers)))
    mismatches = sum(not same(got, reference(seed, x, features)) for seed, got in checked)
    return {"rps": len(answers) / elapsed, "errors": errors, "mismatches": mismatches}


def stream_load(port: int, bodies: Sequence[Body], *, count: int) -> dict[str, float]:
    """One RoundTripStream of ``count`` requests cycling through ``bodies``, every answer
    compared with the reference."""
    return asyncio.run(_stream(port, bodies, count))


async def _stream(port: int, bodies: Sequence[Body], count: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)

        async def messages():  # type: ignore[no-untyped-def]
            for index in range(count):
                yield pb.RoundTripStreamRequest(
                    id=index, request=bodies[index % len(bodies)].request
                )

        mismatches = answered = 0
        began = time.perf_counter()
        async for response in stub.RoundTripStream(messages(), timeout=600):
            answered += 1
            body = bodies[response.id % len(bodies)]
            mismatches += response.HasField("error") or not same(
                answer_of(response.response), body.expected
            )
        elapsed = time.perf_counter() - began
    return {"rps": answered / elapsed, "mismatches": mismatches, "errors": 0}


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds.

    >>> percentiles([0.001] * 199 + [0.1])
    {'p50_ms': 1.0, 'p99_ms': 1.0}
    """
    if not seconds:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(seconds)
    return {
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2),
        "p99_ms": round(1000 * ordered[min(int(len(ordered) * 0.99), len(ordered) - 1)], 2),
    }


# --- the machine ---------------------------------------------------------------------------


def machine(load: str = "load generators on the same cores") -> dict[str, Any]:
    """What a report's figures were measured on, read off this machine: runs on different
    days or nodes compare only when their machines do (the same size of machine computed
    1.5 x slower one day than the day before).

    >>> described = machine("h2load on the same cores")
    >>> described["cpus"] == os.cpu_count(), described["load"]
    (True, 'h2load on the same cores')
    >>> sorted(described)
    ['container_memory_gib', 'cpu_isa', 'cpu_model', 'cpus', 'load', 'memory_gib']
    """
    from roundtrip.server.admission import container_memory_limit
    from roundtrip.server.numerics import cpu_flags, host_isa

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = container_memory_limit()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpu_isa": host_isa(cpu_flags()),
        "memory_gib": round(memory / 2**30, 1),
        "container_memory_gib": None if limit is None else round(limit / 2**30, 1),
        "load": load,
    }


def engine_batch_ms(workload: str = "W2", batch: int = 16, repeats: int = 300) -> float:
    """How fast this machine computes: the median milliseconds of one batch of ``batch``
    requests of ``workload`` through a warmed engine in this process, no RPC."""
    from roundtrip.server.engine import Engine
    from roundtrip.server.values import RoundTripInput

    width, features = WORKLOADS[workload]
    engine = Engine(max_compiled=8, max_batch_size=batch)
    rng = np.random.default_rng(0)
    items = [
        RoundTripInput(seed, rng.standard_normal(width).astype(np.float32), features)
        for seed in range(batch)
    ]
    engine.run(items)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.run(items)
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)
