"""The benchmark: the worker beside its ceilings and its predecessor, in one run.

    make bench                     # or: python -m bench.run --duration 10

Measures, on this machine, one after the other:

* unary RoundTrip under h2load (an independent C load generator replaying one
  pre-serialized request: the seed is fixed) against the worker, the empty
  grpc.aio handler (the RPC ceiling) and the naive eager server;
* unary RoundTrip from an asyncio client that varies the seed on every
  request and checks every answer against the eager reference;
* the stream path: one RoundTripStream, many requests;
* the compute ceiling: the engine in-process, no RPC;
* a sweep of width x features, and throughput and p99 against concurrency.

Writes ``docs/bench/results.md`` (tables) and ``docs/bench/concurrency.png``.
h2load counts an HTTP 200 that carries a gRPC error as a success, so every
h2load body is also checked once through the client, and the worker's answers
in the asyncio runs are compared with the reference one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from conftest import metrics_page
from roundtrip.client import RoundTripClient
from roundtrip.client.messages import build_request
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"
METHOD = "/roundtrip.v1.RoundTripService/RoundTrip"
WORKLOADS = {"W1": (3, 4), "W2": (64, 64), "W3": (1024, 1024)}
#: A running worker's metrics port, by its gRPC port (from its "listening" log line).
METRICS_PORTS: dict[int, int] = {}
#: A worker's V2 REST port, by its gRPC port.
HTTP_PORTS: dict[int, int] = {}


@dataclass
class Case:
    request: pb.RoundTripRequest
    expected: tuple[float, float, float] | None


def cases(width: int, features: int, count: int, *, check: bool) -> list[Case]:
    """``count`` requests with distinct seeds and x; expected answers from the eager reference."""
    from roundtrip.server.reference import eager_round_trip

    rng = np.random.default_rng(width * 7 + features)
    made = []
    for index in range(count):
        if (width, features) == WORKLOADS["W1"] and index == 0:
            x = np.array([1.0, 2.0, 3.0], np.float32)
        else:
            x = rng.standard_normal(width).astype(np.float32)
        seed = int(rng.integers(-(2**63), 2**63 - 1))
        expected = None
        if check:
            r = eager_round_trip(seed, x, features)
            expected = (r.orig_sum, r.merged_sum, r.max_abs_diff)
        made.append(Case(build_request(seed, x, features), expected))
    return made


def machine(load: str = "load generators on the same cores") -> dict[str, Any]:
    """What a report's figures were measured on, read off this machine rather than assumed:
    runs on different days or nodes compare only when their machines do (docs/benchmarks.md's
    rerun of 2026-11-27 computed 1.5 x slower on a machine of the same size).

    >>> described = machine("h2load on the same cores")
    >>> described["cpus"] == os.cpu_count(), described["load"]
    (True, 'h2load on the same cores')
    >>> sorted(described)
    ['container_memory_gib', 'cpu_isa', 'cpu_model', 'cpus', 'load', 'memory_gib']

    The worker's own readings supply the rest: the newest instruction set the CPU runs (what
    XLA's CPU kernels are chosen for) and the container's memory limit (None: no limit).
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


def describe(described: dict[str, Any]) -> str:
    """:func:`machine`'s reading in words, for a report's heading.

    >>> describe({"cpus": 2, "cpu_model": "Xeon", "memory_gib": 23.5, "load": "h2load"})
    '2 cores (Xeon), 23.5 GiB; h2load'
    """
    return (
        f"{described['cpus']} cores ({described['cpu_model']}), "
        f"{described['memory_gib']} GiB; {described['load']}"
    )


def scrape(port: int) -> str:
    """The /metrics page of the worker serving gRPC on ``port`` (started by :func:`server`)."""
    return metrics_page(METRICS_PORTS[port])


@contextmanager
def server(
    kind: str,
    *flags: str,
    launcher: Sequence[str] = ("-m", "roundtrip.server"),
    env: Mapping[str, str] | None = None,
) -> Iterator[int]:
    """Start ``worker``, ``empty`` or ``naive`` on a free port; yield the port once it answers.

    ``launcher``: how the worker is started (``bench.ladder`` starts it altered); ``env``:
    variables added to this process's environment (``bench.accelerator`` picks the backend).
    """
    if kind == "worker":
        command = [
            sys.executable,
            *launcher,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            *flags,
        ]
    else:
        command = [sys.executable, "-m", "bench.servers", kind, *flags]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    port_found = threading.Event()
    port = [0]
    last_lines: deque[str] = deque(maxlen=20)  # what it said last, should it fail to start

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            last_lines.append(line.rstrip()[:1000])
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "listening":
                port[0] = int(event["port"])
                if "metrics_port" in event:
                    METRICS_PORTS[port[0]] = int(event["metrics_port"])
                    HTTP_PORTS[port[0]] = int(event.get("http_port") or 0)
                port_found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        try:
            deadline = time.monotonic() + 120
            while not port_found.wait(0.2):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not report its port")
            if kind == "worker":
                _wait_serving(port[0])
            _wait_answering(port[0])
        except Exception as error:
            said = "\n".join(last_lines)
            raise RuntimeError(f"{kind} server did not start; it said last:\n{said}") from error
        yield port[0]
    finally:
        process.terminate()
        process.wait(60)


def _wait_serving(port: int, timeout: float = 1200) -> None:
    """Until the worker's health says SERVING (its warm-up is done)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.5)
    raise RuntimeError("worker never reported SERVING")


def _wait_answering(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    request = build_request(0, [1.0, 2.0, 3.0], 4)
    while time.monotonic() < deadline:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                pb_grpc.RoundTripServiceStub(channel).RoundTrip(request, timeout=30)
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
        time.sleep(0.2)
    raise RuntimeError("server never answered")


def h2load(
    port: int,
    request: Any,
    *,
    duration: int,
    clients: int,
    streams: int,
    method: str = METHOD,
) -> dict[str, float]:
    """req/s and mean latency from h2load replaying one gRPC-framed request to ``method``."""
    body = request.SerializeToString()
    return h2load_body(
        f"http://127.0.0.1:{port}{method}",
        b"\x00" + struct.pack(">I", len(body)) + body,
        ["content-type: application/grpc", "te: trailers"],
        duration=duration,
        clients=clients,
        streams=streams,
    )


def h2load_body(
    url: str,
    payload: bytes,
    headers: list[str],
    *,
    duration: int,
    clients: int,
    streams: int,
    h1: bool = False,
) -> dict[str, float]:
    """h2load replaying ``payload`` to ``url`` (``h1``: HTTP/1.1, ``streams`` pipelined)."""
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as handle:
        handle.write(payload)
    command = ["h2load", "-D", str(duration), "--warm-up-time", "2", "-c", str(clients)]
    command += ["-m", str(streams), "-t", "1", "-d", handle.name, *(["--h1"] if h1 else [])]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    os.unlink(handle.name)
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output).group(1))  # type: ignore[union-attr]
    succeeded = int(re.search(r"(\d+) succeeded", output).group(1))  # type: ignore[union-attr]
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", output).group(1)  # type: ignore[union-attr]
    return {"rps": rps, "succeeded": succeeded, "mean_ms": _ms(mean)}


def _ms(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group(0))  # type: ignore[union-attr]
    return (
        value / 1000
        if text.endswith("us")
        else value * 1000
        if text.endswith("s") and not text.endswith("ms")
        else value
    )


async def _client_load(
    port: int, load: list[Case], concurrency: int, duration: float
) -> dict[str, float]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(min(concurrency, 4))]
    stubs = [pb_grpc.RoundTripServiceStub(c) for c in channels]
    latencies: list[float] = []
    mismatches = errors = 0
    stop = time.monotonic() + duration

    async def caller(worker: int) -> None:
        nonlocal mismatches, errors
        stub = stubs[worker % len(stubs)]
        index = worker
        while time.monotonic() < stop:
            case = load[index % len(load)]
            index += concurrency
            started = time.perf_counter()
            try:
                response = await stub.RoundTrip(case.request, timeout=60)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            got = (response.orig_sum, response.merged_sum, response.max_abs_diff)
            if case.expected is not None and not _same(got, case.expected):
                mismatches += 1

    began = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    for channel in channels:
        await channel.close()
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "requests": len(latencies),
        "mismatches": mismatches,
        "errors": errors,
    }


def _same(got: tuple[float, ...], want: tuple[float, ...]) -> bool:
    """The three numbers bit for bit (0.0 is not -0.0; any NaN matches any NaN): the
    worker's own check, which its self-check and audit use.

    >>> _same((0.0, 0.0, 1.5), (0.0, 0.0, 1.5)), _same((0.0, 0.0, 0.0), (-0.0, 0.0, 0.0))
    (True, False)
    """
    from roundtrip.server.engine import RoundTripAnswer
    from roundtrip.server.reference import same_answer

    return same_answer(RoundTripAnswer(*got), RoundTripAnswer(*want))


def client_load(
    port: int, load: list[Case], *, concurrency: int, duration: float
) -> dict[str, float]:
    return asyncio.run(_client_load(port, load, concurrency, duration))


async def _stream_load(port: int, load: list[Case], count: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)

        async def messages():  # type: ignore[no-untyped-def]
            for index in range(count):
                yield pb.RoundTripStreamRequest(id=index, request=load[index % len(load)].request)

        mismatches = answered = 0
        began = time.perf_counter()
        async for response in stub.RoundTripStream(messages(), timeout=600):
            answered += 1
            case = load[response.id % len(load)]
            r = response.response
            if response.HasField("error") or (
                case.expected is not None
                and not _same((r.orig_sum, r.merged_sum, r.max_abs_diff), case.expected)
            ):
                mismatches += 1
        elapsed = time.perf_counter() - began
    return {"rps": answered / elapsed, "requests": answered, "mismatches": mismatches}


def stream_load(port: int, load: list[Case], *, count: int) -> dict[str, float]:
    return asyncio.run(_stream_load(port, load, count))


def compute_ceiling(width: int, features: int, *, batch: int = 1, repeats: int = 50) -> float:
    """Median seconds per request of the engine in-process (no RPC), after compiling."""
    from roundtrip.server.engine import Engine, RoundTripInput

    engine = Engine(max_compiled=4, max_batch_size=batch)
    rng = np.random.default_rng(0)
    items = [
        RoundTripInput(i, rng.standard_normal(width).astype(np.float32), features)
        for i in range(batch)
    ]
    engine.run(items)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.run(items)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / batch


def check_body(port: int, case: Case) -> None:
    """The h2load body's own answer must equal the reference (h2load cannot tell)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        r = pb_grpc.RoundTripServiceStub(channel).RoundTrip(case.request, timeout=60)
    assert case.expected is not None
    if not _same((r.orig_sum, r.merged_sum, r.max_abs_diff), case.expected):
        raise AssertionError("the h2load body's answer differs from the reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per h2load run")
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client (make bench does)")
    duration = 3 if args.quick else args.duration
    client_seconds = 3.0 if args.quick else 8.0
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }

    def record(name: str, value: dict[str, float]) -> None:
        results[name] = value
        print(name, json.dumps(value), flush=True)

    w1 = cases(*WORKLOADS["W1"], 1, check=True)
    w2 = cases(*WORKLOADS["W2"], 64, check=True)
    w3 = cases(*WORKLOADS["W3"], 4 if args.quick else 8, check=True)

    record("compute W1", {"us_per_request": 1e6 * compute_ceiling(3, 4)})
    record("compute W2", {"us_per_request": 1e6 * compute_ceiling(64, 64)})
    record("compute W2 batch 32", {"us_per_request": 1e6 * compute_ceiling(64, 64, batch=32)})
    record("compute W3", {"us_per_request": 1e6 * compute_ceiling(1024, 1024, repeats=20)})

    with server("empty") as port:
        record(
            "empty W2 h2load", h2load(port, w2[0].request, duration=duration, clients=8, streams=16)
        )
        record(
            "empty W2 client c64",
            client_load(
                port, cases(64, 64, 8, check=False), concurrency=64, duration=client_seconds
            ),
        )
        sweep_empty = {
            c: client_load(
                port, cases(64, 64, 8, check=False), concurrency=c, duration=client_seconds / 2
            )
            for c in (1, 4, 16, 64, 128)
        }
        record(
            "empty W3 h2load", h2load(port, w3[0].request, duration=duration, clients=2, streams=1)
        )

    with server("naive") as port:
        check_body(port, w2[0])
        record(
            "naive W2 h2load", h2load(port, w2[0].request, duration=duration, clients=8, streams=16)
        )
        record(
            "naive W2 client c64 varied seeds",
            client_load(port, w2, concurrency=64, duration=client_seconds),
        )
        check_body(port, w3[0])
        record(
            "naive W3 h2load", h2load(port, w3[0].request, duration=duration, clients=2, streams=1)
        )

    with server("worker", "--warmup-shapes", "3:4,64:64,1024:1024") as port:
        check_body(port, w1[0])
        record(
            "worker W1 h2load",
            h2load(port, w1[0].request, duration=duration, clients=8, streams=16),
        )
        check_body(port, w2[0])
        record(
            "worker W2 h2load",
            h2load(port, w2[0].request, duration=duration, clients=8, streams=16),
        )
        record(
            "worker W2 client c64 varied seeds",
            client_load(port, w2, concurrency=64, duration=client_seconds),
        )
        record("worker W2 stream", stream_load(port, w2, count=5_000 if args.quick else 30_000))
        sweep_worker = {
            c: client_load(port, w2, concurrency=c, duration=client_seconds / 2)
            for c in (1, 4, 16, 64, 128)
        }
        check_body(port, w3[0])
        record(
            "worker W3 h2load", h2load(port, w3[0].request, duration=duration, clients=2, streams=1)
        )
        record(
            "worker W3 sequential", client_load(port, w3, concurrency=1, duration=client_seconds)
        )
        sweep_shapes = {}
        with RoundTripClient(f"127.0.0.1:{port}", timeout=120) as client:
            for width in (4, 64, 1024, 4096):
                for features in (4, 64, 1024, 4096):
                    x = np.ones(width, np.float32)
                    client.round_trip(1, x, features)  # compile
                    times = []
                    for seed in range(10):
                        started = time.perf_counter()
                        client.round_trip(seed, x, features)
                        times.append(time.perf_counter() - started)
                    sweep_shapes[(width, features)] = (
                        1000 * statistics.median(times),
                        1000 * compute_ceiling(width, features, repeats=10),
                    )
                    print("sweep", width, features, sweep_shapes[(width, features)], flush=True)

    results["sweep_concurrency"] = {"empty": sweep_empty, "worker": sweep_worker}
    results["sweep_shapes"] = {f"{w}x{f}": v for (w, f), v in sweep_shapes.items()}
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_report(results, sweep_empty, sweep_worker, sweep_shapes)
    plot(sweep_empty, sweep_worker)


def write_report(
    results: dict[str, Any],
    sweep_empty: dict[int, dict[str, float]],
    sweep_worker: dict[int, dict[str, float]],
    sweep_shapes: dict[tuple[int, int], tuple[float, float]],
) -> None:
    r = results
    empty, naive, worker = (
        r["empty W2 h2load"]["rps"],
        r["naive W2 h2load"]["rps"],
        r["worker W2 h2load"]["rps"],
    )
    w3_latency = r["worker W3 sequential"]["p50_ms"]
    w3_compute = r["compute W3"]["us_per_request"] / 1000
    lines = [
        f"# Benchmark results ({r['started']}, {describe(r['machine'])})",
        "",
        "Generated by `make bench` (`python -m bench.run`); every figure is from this one run.",
        "",
        "| run | req/s | p50 ms | p99 ms | mean ms | answers differing from the reference |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, value in r.items():
        if not isinstance(value, dict) or "rps" not in value:
            continue
        lines.append(
            f"| {name} | {value['rps']:.0f} | {value.get('p50_ms', float('nan')):.2f} | "
            f"{value.get('p99_ms', float('nan')):.2f} | {value.get('mean_ms', float('nan')):.2f} | "
            f"{value.get('mismatches', 'n/a (h2load; body checked)')} |"
        )
    lines += [
        "",
        "| ratio (W2, h2load 8x16) | value |",
        "| --- | ---: |",
        f"| worker / empty-handler ceiling | {worker / empty:.2f} |",
        f"| worker / naive eager server | {worker / naive:.1f} |",
        f"| worker stream / empty-handler unary | {r['worker W2 stream']['rps'] / empty:.2f} |",
        f"| W3 worker p50 latency / in-process compute | {w3_latency / w3_compute:.2f} |",
        "",
        "| compute ceiling (engine in-process, no RPC) | us per request |",
        "| --- | ---: |",
    ]
    lines += [
        f"| {k} | {v['us_per_request']:.0f} |" for k, v in r.items() if k.startswith("compute")
    ]
    lines += [
        "",
        "| concurrency | empty req/s | empty p99 ms | worker req/s | worker p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in sweep_worker:
        e, w = sweep_empty[c], sweep_worker[c]
        lines.append(
            f"| {c} | {e['rps']:.0f} | {e['p99_ms']:.2f} | {w['rps']:.0f} | {w['p99_ms']:.2f} |"
        )
    lines += [
        "",
        "| width x features | worker p50 ms (1 caller) | in-process ms |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {w} x {f} | {a:.2f} | {b:.2f} |" for (w, f), (a, b) in sweep_shapes.items()]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(
    sweep_empty: dict[int, dict[str, float]], sweep_worker: dict[int, dict[str, float]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, sweep in (
        ("empty handler (ceiling)", sweep_empty),
        ("worker, varied seeds", sweep_worker),
    ):
        levels = sorted(sweep)
        left.plot(levels, [sweep[c]["rps"] for c in levels], marker="o", label=name)
        right.plot(levels, [sweep[c]["p99_ms"] for c in levels], marker="o", label=name)
    for axis, label in ((left, "requests/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent callers (asyncio client, W2 64x64)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(OUT / "concurrency.png", dpi=110)


if __name__ == "__main__":
    main()
