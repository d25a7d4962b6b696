"""The worker on this node's accelerator, beside the same worker on its CPUs, in one run.

    python -m bench.accelerator --rounds 3 --duration 10   # -> docs/bench/accelerator.json

Run it on a GPU (or TPU) node before sizing pods for it, with the ``XLA_FLAGS`` the pods
get (the ``gpu`` overlay's: ``--xla_gpu_autotune_level=0``). It needs h2load and a JAX that
sees the accelerator (the image's ``cuda`` target has one). Every process it starts
shares the device, so it turns off XLA's preallocation of most of a GPU's memory
(``XLA_PYTHON_CLIENT_PREALLOCATE=false``) unless the environment already sets it.

First the answers. Each worker (the accelerator's, then the CPUs') gets a sweep of
shapes (the worked example, W2, W3, width 1, wide and narrow, rows of x), seeds that
repeat (the parameter cache's tiers) and seeds sent once, all at once as unary calls
so that they meet in batches, then again as one RoundTripBatch. Every answer is
compared bit for bit with the eager reference, run in this process on the worker's
own backend; the report also gives the mean batch size the sweep ran in.

Then the figures, per round, each server started afresh, in an order that flips every
round: W2 unary under h2load (8 connections x 16 streams, one body), W2 through
RoundTripBatch (64 seeds a message), W3 with a repeated seed (h2load) and W3 with a
fresh seed per request (16 asyncio callers, a sample checked), for the worker on the
accelerator and on the CPUs; the empty handler (W2) and the naive eager server on the
accelerator (W2 and W3) beside them. Ratios are of medians over the rounds.

With no accelerator (JAX sees only CPUs) both workers run on the CPUs: a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import statistics
from typing import Any

import grpc
import jax
import numpy as np

from bench.run import OUT, cases, check_body, h2load, machine, scrape, server
from bench.throughput import WORKER_FLAGS, batch_body, w2_loads, w3_loads
from conftest import metric_value
from roundtrip.client.messages import build_request
from roundtrip.server.engine import RoundTripAnswer
from roundtrip.server.reference import eager_round_trip, same_answer
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

#: (shape of x, features): the worked example, W2, W3, width 1, wide, narrow, rows of x.
SWEEP = [((3,), 4), ((64,), 64), ((1024,), 1024), ((1,), 1), ((7,), 300), ((300,), 7)]
SWEEP += [((4, 64), 64), ((2, 3), 5)]


def sweep_requests() -> list[tuple[int, np.ndarray, int]]:
    """Per shape: six seeds sent three times each (cached after the first) and six once."""
    rng = np.random.default_rng(2026)
    made = []
    for shape, features in SWEEP:
        if shape == (3,):
            x = np.array([1.0, 2.0, 3.0], np.float32)
        else:
            x = rng.standard_normal(shape).astype(np.float32)
        seeds = [int(s) for s in rng.integers(-(2**63), 2**63 - 1, 12)]
        made += [(seed, x, features) for seed in seeds[:6] for _ in range(3)]
        made += [(seed, x, features) for seed in seeds[6:]]
    return made


async def _sweep_calls(port: int, requests: list[pb.RoundTripRequest]) -> list[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)
        unary = await asyncio.gather(
            *(stub.RoundTrip(r, timeout=300) for r in requests), return_exceptions=True
        )
        batch = await stub.RoundTripBatch(pb.RoundTripBatchRequest(requests=requests), timeout=300)
    return [*unary, *(o.error if o.HasField("error") else o.response for o in batch.outcomes)]


def sweep(port: int) -> dict[str, Any]:
    """The sweep against one worker: answers that differ from the reference, and batch sizes."""
    sent = sweep_requests()
    want = {}
    for seed, x, features in sent:
        key = (seed, x.tobytes(), features)
        if key not in want:
            want[key] = eager_round_trip(seed, x, features)
    before = scrape(port)
    got = asyncio.run(_sweep_calls(port, [build_request(s, x, f) for s, x, f in sent]))
    after = scrape(port)
    errors = mismatches = 0
    differing: set[str] = set()
    for (seed, x, features), answer in zip([*sent, *sent], got, strict=True):
        if not isinstance(answer, pb.RoundTripResponse):
            errors += 1
            continue
        mine = RoundTripAnswer(answer.orig_sum, answer.merged_sum, answer.max_abs_diff)
        if not same_answer(mine, want[(seed, x.tobytes(), features)]):
            mismatches += 1
            differing.add(f"{list(x.shape)}->{features}")

    def grew(sample: str) -> float:
        return metric_value(after, sample, 0.0) - metric_value(before, sample, 0.0)

    batches = grew("roundtrip_batch_size_count")
    return {
        "answers": len(got),
        "errors": errors,
        "mismatches": mismatches,
        "differing_shapes": sorted(differing),
        "mean_batch_size": round(grew("roundtrip_batch_size_sum") / batches, 2) if batches else 0,
    }


def server_info(port: int) -> dict[str, Any]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = pb_grpc.RoundTripServiceStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=30
        )
    return {
        "backend": info.backend,
        "devices": list(info.devices),
        "compute_lanes": info.compute_lanes,
        "jax_version": info.jax_version,
        "device_kind": info.numerics.device_kind,
        "fingerprint": info.numerics.fingerprint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--out", default=str(OUT / "accelerator.json"))
    args = parser.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    accelerator = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    if accelerator.platform == "cpu":
        print("JAX sees no accelerator: both workers run on the CPUs (a smoke run)", flush=True)
    targets = {"accelerator": (accelerator, {}), "cpu": (cpu, {"JAX_PLATFORMS": "cpu"})}
    bodies = {}
    for name, (device, _) in targets.items():
        with jax.default_device(device):  # the references on the worker's own backend
            bodies[name] = (
                cases(64, 64, 1, check=True)[0],
                cases(1024, 1024, 1, check=True)[0],
                *batch_body(),
            )
    runs: dict[str, list[float]] = {}
    report: dict[str, Any] = {"workers": {}, "exactness": {}, "fresh_seed_mismatches": 0}

    def record(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)
        print(name, round(value, 1), flush=True)

    def h2(port: int, body: Any, streams: int = 16, **kw: Any) -> float:
        return h2load(port, body, duration=args.duration, clients=8, streams=streams, **kw)["rps"]

    fresh = 2 * 10**9
    for round_ in range(args.rounds):
        order = ["accelerator", "cpu", "naive", "empty"]
        for kind in order if round_ % 2 == 0 else order[::-1]:
            if kind in targets:
                device, env = targets[kind]
                w2, w3, batch, batch_expected = bodies[kind]
                with server("worker", *WORKER_FLAGS, env=env) as port, jax.default_device(device):
                    if round_ == 0:
                        report["workers"][kind] = server_info(port)
                        report["exactness"][kind] = sweep(port)
                        print(kind, report["workers"][kind], report["exactness"][kind])
                    w2_loads(port, w2, batch, batch_expected, label=kind, h2=h2, record=record)
                    result = w3_loads(
                        port, w3, fresh, label=kind, duration=args.duration, h2=h2, record=record
                    )
                    fresh += 100_000
                    report["fresh_seed_mismatches"] += result["sample_mismatches"]
            elif kind == "naive":
                w2, w3 = bodies["accelerator"][:2]
                with server("naive") as port:
                    check_body(port, w2)
                    record("W2 unary, naive", h2(port, w2.request))
                    check_body(port, w3)
                    record("W3 repeated seed, naive", h2(port, w3.request, streams=4))
            else:
                with server("empty") as port:
                    record("W2 unary, empty handler", h2(port, bodies["accelerator"][0].request))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratios = {
        f"{workload}: accelerator / cpu": medians[f"{workload}, accelerator"]
        / medians[f"{workload}, cpu"]
        for workload in (
            "W2 unary",
            "W2 RoundTripBatch x64 results/s",
            "W3 repeated seed",
            "W3 fresh seeds",
        )
    }
    ratios["W2 unary: accelerator / empty handler"] = (
        medians["W2 unary, accelerator"] / medians["W2 unary, empty handler"]
    )
    for workload in ("W2 unary", "W3 repeated seed"):
        ratios[f"{workload}: accelerator / naive on the accelerator"] = (
            medians[f"{workload}, accelerator"] / medians[f"{workload}, naive"]
        )
    report |= {
        "runs": runs,
        "medians": medians,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "machine": machine("h2load and every server on the same cores")
        | {
            "accelerator": accelerator.device_kind,
            "jax": jax.__version__,
            "flax": importlib.metadata.version("flax"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "rounds": args.rounds,
        "duration_s": args.duration,
    }
    with open(args.out, "w") as handle:
        handle.write(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
