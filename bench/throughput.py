"""Throughput II: what the parameter cache and RoundTripBatch buy, beside their ceilings.

    python -m bench.throughput --rounds 3 --duration 10   # -> docs/bench/throughput.json

Every round starts each server afresh, in an order that flips every round, and measures:

* W2 (64 -> 64) unary under h2load (8 connections x 16 streams, one body replayed): the
  worker and the empty grpc.aio handler (the RPC ceiling, on asyncio's standard loop); for
  reference, the worker on ``--event-loop asyncio`` (what uvloop, its default, buys) and
  the empty handler on uvloop (the ceiling of the worker's own loop);
* W2 through RoundTripBatch: h2load replays one message of 64 requests with 64 different
  seeds (8 x 4 streams); results per second are its req/s x 64;
* W3 (1024 -> 1024) with a repeated seed (h2load, one body): the worker with its parameter
  cache, the worker with the cache off (``--max-param-cache-bytes 0``: the path every
  request took before), and the naive eager server;
* W3 with a fresh seed on every request (16 asyncio callers, seeds never repeated within
  or across runs): cache on and off.

Before any load, each body's answer is checked against the eager reference (each of the
batch's 64 outcomes too); the fresh-seed runs check a sample of their answers against it,
and every worker audits its default share of answers (audit_fraction) in the background:
the report counts every
mismatch. Ratios are of medians over the rounds, measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from bench.ladder import alone
from bench.run import OUT, Case, _same, cases, check_body, h2load, machine, scrape, server
from conftest import metric_value
from roundtrip.client.messages import build_request
from roundtrip.server.reference import eager_round_trip
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

BATCH_METHOD = "/roundtrip.v1.RoundTripService/RoundTripBatch"
WORKER_FLAGS = ("--warmup-shapes", "64:64,1024:1024")
SAMPLE = 24


def batch_body() -> tuple[pb.RoundTripBatchRequest, list[tuple[float, float, float]]]:
    """64 W2 requests, 64 different seeds, and their reference answers."""
    rng = np.random.default_rng(64)
    x = rng.standard_normal(64).astype(np.float32)
    seeds = [int(s) for s in rng.integers(-(2**31), 2**31, 64)]
    expected = []
    for seed in seeds:
        r = eager_round_trip(seed, x, 64)
        expected.append((r.orig_sum, r.merged_sum, r.max_abs_diff))
    return pb.RoundTripBatchRequest(requests=[build_request(s, x, 64) for s in seeds]), expected


def check_batch(port: int, body: pb.RoundTripBatchRequest, expected: list[Any]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = pb_grpc.RoundTripServiceStub(channel).RoundTripBatch(body, timeout=60)
    for outcome, want in zip(response.outcomes, expected, strict=True):
        r = outcome.response
        if outcome.HasField("error") or not _same((r.orig_sum, r.merged_sum, r.max_abs_diff), want):
            raise AssertionError("a batch outcome differs from the reference")


async def fresh_seed_load(port: int, first_seed: int, duration: float) -> dict[str, Any]:
    """16 callers, W3, every request a seed never used before; a sample checked after."""
    x = np.random.default_rng(3).standard_normal(1024).astype(np.float32)
    next_seed = first_seed
    answers: list[tuple[int, tuple[float, float, float]]] = []
    errors = 0
    stop = time.monotonic() + duration
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)

        async def caller() -> None:
            nonlocal next_seed, errors
            while time.monotonic() < stop:
                seed, next_seed = next_seed, next_seed + 1
                try:
                    r = await stub.RoundTrip(build_request(seed, x, 1024), timeout=120)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                answers.append((seed, (r.orig_sum, r.merged_sum, r.max_abs_diff)))

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(16)))
        elapsed = time.perf_counter() - began
    mismatches = 0
    for seed, got in random.Random(first_seed).sample(answers, min(SAMPLE, len(answers))):
        want = eager_round_trip(seed, x, 1024)
        mismatches += not _same(got, (want.orig_sum, want.merged_sum, want.max_abs_diff))
    return {"rps": len(answers) / elapsed, "errors": errors, "sample_mismatches": mismatches}


def w2_loads(
    port: int,
    body: Case,
    batch: pb.RoundTripBatchRequest,
    batch_expected: list[Any],
    *,
    label: str,
    h2: Callable[..., float],
    record: Callable[[str, float], None],
) -> None:
    """W2 unary and RoundTripBatch x64 against one worker, each body checked first."""
    check_body(port, body)
    record(f"W2 unary, {label}", h2(port, body.request))
    check_batch(port, batch, batch_expected)
    items = 64 * h2(port, batch, streams=4, method=BATCH_METHOD)
    record(f"W2 RoundTripBatch x64 results/s, {label}", items)


def w3_loads(
    port: int,
    body: Case,
    first_seed: int,
    *,
    label: str,
    duration: int,
    h2: Callable[..., float],
    record: Callable[[str, float], None],
) -> dict[str, Any]:
    """W3 from one body's repeated seed (h2load, 8 x 4; the body checked first), then with
    a fresh seed on every request from ``first_seed`` on: :func:`fresh_seed_load`'s result."""
    check_body(port, body)
    record(f"W3 repeated seed, {label}", h2(port, body.request, streams=4))
    result = asyncio.run(fresh_seed_load(port, first_seed, duration))
    record(f"W3 fresh seeds, {label}", result["rps"])
    return result


def audit(port: int) -> tuple[float, float]:
    """(answers audited, mismatches) from the worker's metrics, once its audit queue is done."""
    time.sleep(3)  # the audit re-runs answers in the background
    text = scrape(port)
    return metric_value(text, "roundtrip_audit_checks_total", 0.0), metric_value(
        text, "roundtrip_audit_mismatches_total", 0.0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    w2 = cases(64, 64, 1, check=True)[0]
    w3 = cases(1024, 1024, 1, check=True)[0]
    batch, batch_expected = batch_body()
    runs: dict[str, list[float]] = {}
    checks: dict[str, Any] = {
        "fresh_seed_sample_mismatches": 0,
        "fresh_seed_errors": 0,
        "audited": 0,
        "audit_mismatches": 0,
    }

    def record(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)
        print(name, round(value, 1), flush=True)

    def h2(port: int, body: Any, streams: int = 16, **kw: Any) -> float:
        return h2load(port, body, duration=args.duration, clients=8, streams=streams, **kw)["rps"]

    def w2_runs(port: int, worker: str) -> None:
        w2_loads(port, w2, batch, batch_expected, label=worker, h2=h2, record=record)

    fresh = 10**9
    for round_ in range(args.rounds):
        order = ["worker", "nocache", "asyncio", "empty", "empty-uvloop", "naive"]
        for kind in order if round_ % 2 == 0 else order[::-1]:
            if kind in ("worker", "nocache"):
                flags = WORKER_FLAGS + (
                    ("--max-param-cache-bytes", "0") if kind == "nocache" else ()
                )
                with server("worker", *flags) as port:
                    result = w3_loads(
                        port, w3, fresh, label=kind, duration=args.duration, h2=h2, record=record
                    )
                    fresh += 100_000
                    checks["fresh_seed_sample_mismatches"] += result["sample_mismatches"]
                    checks["fresh_seed_errors"] += result["errors"]
                    if kind == "worker":
                        w2_runs(port, "worker")
                    audited, mismatched = audit(port)
                    checks["audited"] += audited
                    checks["audit_mismatches"] += mismatched
            elif kind == "asyncio":
                with server("worker", *WORKER_FLAGS, "--event-loop", "asyncio") as port:
                    w2_runs(port, "worker on asyncio")
            elif kind == "empty":
                with server("empty") as port:
                    record("W2 unary, empty handler", h2(port, w2.request))
            elif kind == "empty-uvloop":
                with server("empty", "--event-loop", "uvloop") as port:
                    record("W2 unary, empty handler on uvloop", h2(port, w2.request))
            else:
                with server("naive") as port:
                    check_body(port, w3)
                    record("W3 repeated seed, naive", h2(port, w3.request, streams=4))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratios = {
        "W2 unary: worker / empty handler": medians["W2 unary, worker"]
        / medians["W2 unary, empty handler"],
        "W2 RoundTripBatch x64 results/s / empty handler unary req/s": medians[
            "W2 RoundTripBatch x64 results/s, worker"
        ]
        / medians["W2 unary, empty handler"],
        "W2 unary: worker / empty handler on uvloop": medians["W2 unary, worker"]
        / medians["W2 unary, empty handler on uvloop"],
        "W2 unary: worker on uvloop / on asyncio": medians["W2 unary, worker"]
        / medians["W2 unary, worker on asyncio"],
        "W2 RoundTripBatch x64: worker on uvloop / on asyncio": medians[
            "W2 RoundTripBatch x64 results/s, worker"
        ]
        / medians["W2 RoundTripBatch x64 results/s, worker on asyncio"],
        "W3 repeated seed: worker / naive": medians["W3 repeated seed, worker"]
        / medians["W3 repeated seed, naive"],
        "W3 repeated seed: cache on / off": medians["W3 repeated seed, worker"]
        / medians["W3 repeated seed, nocache"],
        "W3 fresh seeds: cache on / off": medians["W3 fresh seeds, worker"]
        / medians["W3 fresh seeds, nocache"],
    }
    report = {
        "runs": runs,
        "medians": medians,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "checks": checks,
        # how fast this machine computes, beside how fast it answers: runs compare only if both do
        "machine": machine() | {"W2 batch of 16 alone, ms": alone(w2.request, 16)},
        "rounds": args.rounds,
        "duration_s": args.duration,
    }
    (OUT / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
