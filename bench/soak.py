"""Soak: minutes of mixed valid and invalid traffic; memory must stay flat, nothing lost.

    python -m bench.soak --minutes 10 --callers 32

Starts a worker and drives it with ``--callers`` concurrent asyncio callers.
Each call picks from a pool: valid requests over several shapes, dtypes and
seeds (answers precomputed with the eager reference steps, so every OK answer
is checked bit for bit) and invalid ones of every kind (features 0, unknown
dtype, raw off by one, negative dims, over-limit features, bytes that are no
message), each with the one status code it must get. A call that ends any
other way, or an OK with other bits, is counted as lost. The worker's RSS is
sampled every ``--sample-s`` seconds. Writes ``docs/bench/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np

from bench.harness import OUT
from roundtrip.client.messages import build_request
from roundtrip.server.numerics.reference import eager_round_trip
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.wire import arrays
from support.workers import WorkerProcess, serving_process

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Probe:
    """One request as bytes on the wire, the code it must get, and the answer when OK."""

    body: bytes
    code: grpc.StatusCode
    answer: tuple[float, float, float] | None = None


def valid_probes(count: int, rng: np.random.Generator) -> list[Probe]:
    shapes = [((3,), 4), ((64,), 64), ((8, 32), 16), ((1,), 1), ((2, 200), 100), ((512,), 8)]
    dtypes = ["float32", "float16", "bfloat16", "float64"]
    probes = []
    for index in range(count):
        shape, features = shapes[index % len(shapes)]
        dtype = dtypes[index % len(dtypes)]
        seed = int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64))
        x = rng.standard_normal(shape).astype(np.float32)
        request = build_request(seed, x, features, dtype=dtype)
        # the reference reads x as the worker does: cast to dtype, as the wire carries it
        result = eager_round_trip(seed, arrays.from_proto(request.x, field="x"), features)
        probes.append(
            Probe(
                request.SerializeToString(),
                OK,
                (result.orig_sum, result.merged_sum, result.max_abs_diff),
            )
        )
    return probes


def invalid_probes() -> list[Probe]:
    f32 = pb.DTYPE_FLOAT32
    requests = [
        (pb.RoundTripRequest(x=pb.Array(values=[1, 2, 3]), features=0), INVALID),
        (pb.RoundTripRequest(x=pb.Array(dtype=77, values=[1.0]), features=4), INVALID),  # type: ignore[arg-type]  # no such dtype
        (
            pb.RoundTripRequest(x=pb.Array(dtype=f32, shape=[3], raw=b"\0" * 11), features=4),
            INVALID,
        ),
        (pb.RoundTripRequest(x=pb.Array(dtype=f32, shape=[-1, 3]), features=4), INVALID),
        (pb.RoundTripRequest(features=4), INVALID),
        (pb.RoundTripRequest(x=pb.Array(values=[1, 2, 3]), features=10**12), EXHAUSTED),
        (pb.RoundTripRequest(x=pb.Array(dtype=f32, shape=[2**40, 2**20]), features=4), INVALID),
    ]
    probes = [Probe(request.SerializeToString(), code) for request, code in requests]
    probes.append(Probe(b"\xff\xff\xff not a message", INVALID))
    return probes


async def drive(
    port: int, pool: list[Probe], weights: list[float], *, seconds: float, callers: int
) -> tuple[Counter[str], list[float]]:
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/roundtrip.v1.RoundTripService/RoundTrip", None, None)

        async def caller(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                probe = rng.choices(pool, weights)[0]
                started = time.perf_counter()
                try:
                    body = await call(probe.body, timeout=30)
                    code = OK
                except grpc.aio.AioRpcError as error:
                    code, body = error.code(), b""
                latencies.append(time.perf_counter() - started)
                if code != probe.code:
                    outcomes[f"lost:{code.name}"] += 1
                elif code == OK:
                    answer = pb.RoundTripResponse.FromString(body)
                    got = (answer.orig_sum, answer.merged_sum, answer.max_abs_diff)
                    same = np.array(got).view(np.int64) == np.array(probe.answer).view(np.int64)
                    outcomes["ok" if same.all() else "wrong"] += 1
                else:
                    outcomes[f"refused:{code.name}"] += 1

        await asyncio.gather(*(caller(i) for i in range(callers)))
    return outcomes, latencies


async def soak(worker: WorkerProcess, args: argparse.Namespace) -> dict[str, object]:
    rng = np.random.default_rng(7)
    valid, invalid = valid_probes(120, rng), invalid_probes()
    pool = valid + invalid
    weights = [args.valid_share / len(valid)] * len(valid) + [
        (1 - args.valid_share) / len(invalid)
    ] * len(invalid)
    samples = []
    totals: Counter[str] = Counter()
    latencies: list[float] = []
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < args.minutes * 60:
        window = min(args.sample_s, args.minutes * 60 - elapsed)
        outcomes, lats = await drive(
            worker.port, pool, weights, seconds=window, callers=args.callers
        )
        totals.update(outcomes)
        latencies.extend(lats)
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                "rss_mib": round(worker.rss_mib(), 1),
                "requests": sum(outcomes.values()),
            }
        )
        print(json.dumps(samples[-1]), flush=True)
    first, last = samples[0]["rss_mib"], samples[-1]["rss_mib"]
    lost = sum(v for k, v in totals.items() if k.startswith("lost") or k == "wrong")
    return {
        "minutes": args.minutes,
        "callers": args.callers,
        "valid_share": args.valid_share,
        "requests": sum(totals.values()),
        "requests_per_s": round(sum(totals.values()) / (time.monotonic() - started), 1),
        "outcomes": dict(sorted(totals.items())),
        "lost_or_wrong": lost,
        "latency_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
        "latency_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2),
        "rss_first_sample_mib": first,
        "rss_last_sample_mib": last,
        "rss_max_mib": max(s["rss_mib"] for s in samples),
        "rss_last_over_first": round(float(last) / float(first), 3),
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--valid-share", type=float, default=0.7)
    parser.add_argument("--sample-s", type=float, default=20.0)
    args = parser.parse_args()
    with serving_process("--warmup-shapes", "3:4,64:64") as worker:
        result = asyncio.run(soak(worker, args))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    (OUT / "soak.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
