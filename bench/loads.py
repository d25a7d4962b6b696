"""The loads: h2load replaying one body over gRPC or HTTP (:func:`h2load`), Triton's
perf_analyzer over V2 (:func:`perf_analyzer`), and asyncio callers through grpc.aio
(:func:`callers`, :func:`fresh_seed_callers`, :func:`stream_load`) that check every
answer as it comes, and the closed- and open-loop callers of one serialized request that
the overload and autoscaling benchmarks time (:func:`closed_loop`, :func:`open_loop`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np

from bench.checks import ROUNDTRIP, WORKLOADS, Answer, Body, answer_of, reference, same
from roundtrip.client.messages import build_request
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.workers import (
    ROOT,
)

#: Triton's perf_analyzer and the libraries it loads (``make .tools/perf/.synced``).
PERF = ROOT / ".tools" / "perf"


def grpc_frame(message: Any) -> bytes:
    """A message as one gRPC frame: not compressed, its length, its bytes."""
    data: bytes = message.SerializeToString()
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

    >>> from bench.checks import workload_body
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
    number = re.match(r"[\d.]+", text)
    assert number is not None, text
    value = float(number.group(0))
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
        await channel.close(None)
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

        async def messages() -> AsyncIterator[pb.RoundTripStreamRequest]:
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


async def closed_loop(port: int, body: bytes, callers: int, seconds: float) -> dict[str, float]:
    """``callers`` each sending ``body`` (a serialized RoundTrip request) back to back for
    ``seconds``: answers per second and their p50/p99 (any error raises)."""
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(ROUNDTRIP, None, None)

        async def caller() -> None:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                await call(body, timeout=60)
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.monotonic() - started
    return {"requests_per_s": round(len(latencies) / elapsed, 1), **percentiles(latencies)}


async def open_loop(port: int, body: bytes, rate: float, seconds: float) -> dict[str, Any]:
    """``body`` sent at ``rate`` calls a second for ``seconds``, each on schedule, not waiting
    for earlier answers (as traffic from many services arrives): the calls by code, OK
    answers a second and their p50/p99, refusals' p50/p99."""
    outcomes: dict[str, list[float]] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(ROUNDTRIP, None, None)

        async def one() -> None:
            started = time.perf_counter()
            try:
                await call(body, timeout=60)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
            outcomes.setdefault(code, []).append(time.perf_counter() - started)

        tasks = []
        start = time.monotonic()
        count = int(rate * seconds)
        for index in range(count):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        sent_in = time.monotonic() - start
        await asyncio.gather(*tasks)
    accepted = outcomes.get("OK", [])
    refused = outcomes.get("RESOURCE_EXHAUSTED", [])
    codes = Counter({code: len(lat) for code, lat in outcomes.items()})
    return {
        "offered_per_s": round(count / sent_in, 1),
        "sent": count,
        "codes": dict(codes),
        "lost": sum(n for code, n in codes.items() if code not in ("OK", "RESOURCE_EXHAUSTED")),
        "accepted_per_s": round(len(accepted) / sent_in, 1),
        "accepted": percentiles(accepted),
        "refused": percentiles(refused),
    }
