"""The worker on this node's accelerator, beside the same worker on its CPUs, in one run.

    python -m bench.accelerator --rounds 3 --duration 10   # -> docs/bench/accelerator.json

Run it on a GPU (or TPU) node before sizing pods for it, with the ``XLA_FLAGS`` the pods
get (the ``gpu`` overlay's: ``--xla_gpu_autotune_level=0``). It needs h2load and a JAX that
sees the accelerator (the image's ``cuda`` target has one). Every process it starts
shares the device, so it turns off XLA's preallocation of most of a GPU's memory
(``XLA_PYTHON_CLIENT_PREALLOCATE=false``) unless the environment already sets it.

First the answers: each worker gets a sweep of shapes (the worked example, W2, W3, width
1, wide and narrow, rows of x), seeds that repeat (the parameter cache's tiers) and seeds
sent once, all at once as unary calls so that they meet in batches, then again as one
RoundTripBatch; every answer is compared bit for bit with the eager reference run here on
the worker's own backend. Then :mod:`bench.run`'s rounds, with the scenarios of
:data:`CHOSEN`, for the worker on the accelerator and on the CPUs, and the naive server
and the empty handler beside them. With no accelerator both workers run on the CPUs: a
smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import time
from typing import Any

import grpc
import jax
import numpy as np

from bench import checks, harness, launch
from bench.checks import Bodies
from bench.report import table
from bench.run import report, run_rounds
from bench.scenarios import SCENARIOS, SERVERS, WORKER_FLAGS, Scenario
from roundtrip.client.messages import build_request
from roundtrip.server.config import WorkerConfig
from roundtrip.server.engine.engine import Engine
from roundtrip.server.values import ShapeSignature
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

CHOSEN = (
    "W2 unary",
    "W2 RoundTripBatch x64",
    "W3 unary (one seed repeated)",
    "W3 unary (fresh seed per request)",
)
#: (shape of x, features): the worked example, W2, W3, width 1, wide, narrow, rows of x.
SWEEP: list[tuple[tuple[int, ...], int]] = [((3,), 4), ((64,), 64), ((1024,), 1024), ((1,), 1)]
SWEEP += [((7,), 300), ((300,), 7), ((4, 64), 64), ((2, 3), 5)]


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


def sweep(launched: launch.Launched) -> dict[str, Any]:
    """The sweep against one worker: answers that differ from the reference, batch sizes."""
    sent = sweep_requests()
    want = {}
    for seed, x, features in sent:
        key = (seed, x.tobytes(), features)
        if key not in want:
            want[key] = checks.reference(seed, x, features)
    batches = launch.metric(launched, "roundtrip_batch_size_count")
    requests = launch.metric(launched, "roundtrip_batch_size_sum")
    got = asyncio.run(_sweep_calls(launched.port, [build_request(s, x, f) for s, x, f in sent]))
    batches = launch.metric(launched, "roundtrip_batch_size_count") - batches
    requests = launch.metric(launched, "roundtrip_batch_size_sum") - requests
    errors = mismatches = 0
    differing: set[str] = set()
    for (seed, x, features), answer in zip([*sent, *sent], got, strict=True):
        if not isinstance(answer, pb.RoundTripResponse):
            errors += 1
        elif not checks.same(checks.answer_of(answer), want[(seed, x.tobytes(), features)]):
            mismatches += 1
            differing.add(f"{list(x.shape)}->{features}")
    return {
        "answers": len(got),
        "errors": errors,
        "mismatches": mismatches,
        "differing_shapes": sorted(differing),
        "mean_batch_size": round(requests / batches, 2) if batches else 0,
    }


def batched_proofs(device: Any) -> dict[str, str]:
    """Per shape of :data:`SWEEP`, at a batch of 64: the program an engine on ``device``
    serves once its proof has run (``batched, rowwise sums``, ``batched, sliced sums``,
    or ``looped``, refused or over ``batched_max_bytes``)."""
    config = WorkerConfig()
    engine = Engine(
        max_compiled=4 * len(SWEEP),
        max_batch_size=64,
        batched_max_bytes=config.batched_max_bytes,
        device=device,
    )
    outcomes = {}
    for shape, features in SWEEP:
        compiled = engine.executable(ShapeSignature(shape, "float32", features), 64)
        kind = f"batched, {compiled.reductions} sums" if compiled.batched else "looped"
        outcomes[f"{list(shape)}->{features}"] = kind
    return outcomes


def server_info(port: int) -> dict[str, Any]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = pb_grpc.RoundTripServiceStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=30
        )
    return {
        "backend": info.backend,
        "devices": list(info.devices),
        "compute_lanes": info.compute_lanes,
        "device_kind": info.numerics.device_kind,
        "fingerprint": info.numerics.fingerprint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--out", default=str(harness.OUT / "accelerator.json"))
    args = parser.parse_args()
    args.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    accelerator, cpu = jax.devices()[0], jax.devices("cpu")[0]
    if accelerator.platform == "cpu":
        print("JAX sees no accelerator: both workers run on the CPUs (a smoke run)", flush=True)
    workers = {
        "worker on the accelerator": (
            launch.ServerSpec("worker on the accelerator", "worker", WORKER_FLAGS),
            accelerator,
        ),
        "worker on the CPUs": (
            launch.ServerSpec(
                "worker on the CPUs", "worker", WORKER_FLAGS, {"JAX_PLATFORMS": "cpu"}
            ),
            cpu,
        ),
    }
    bodies = {name: Bodies(device) for name, (_, device) in workers.items()}
    found: dict[str, Any] = {"workers": {}, "exactness": {}}
    for name, (spec, device) in workers.items():
        with launch.launched(spec) as launched, jax.default_device(device):
            found["workers"][name] = server_info(launched.port)
            found["exactness"][name] = sweep(launched)
            print(name, found["workers"][name], found["exactness"][name], flush=True)
        found.setdefault("batched_programs", {})[name] = batched_proofs(device)
        print(name, found["batched_programs"][name], flush=True)
    peers = {"naive": ("W2 unary", "W3 unary (one seed repeated)"), "empty handler": ("W2 unary",)}

    def runs_on(scenario: Scenario, spec: launch.ServerSpec) -> bool:
        return spec.name in workers or scenario.name in peers.get(spec.name, ())

    run = run_rounds(
        [*(spec for spec, _ in workers.values()), SERVERS["naive"], SERVERS["empty handler"]],
        [scenario for scenario in SCENARIOS if scenario.name in CHOSEN],
        rounds=args.rounds,
        duration=args.duration,
        runs_on=runs_on,
        bodies_for=lambda spec: bodies.get(spec.name, bodies["worker on the accelerator"]),
    )
    medians = run.medians()
    ratios = {
        f"{name}: accelerator / CPUs": round(
            by_server["worker on the accelerator"] / by_server["worker on the CPUs"], 3
        )
        for name, by_server in medians.items()
    }
    results = report(run, args, found | {"ratios": ratios})
    results["machine"] |= {
        "accelerator": accelerator.device_kind,
        "jax": jax.__version__,
        "flax": importlib.metadata.version("flax"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print(table(results))
    with open(args.out, "w") as handle:
        handle.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
