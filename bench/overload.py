"""Overload: the worker at ten times the load it can sustain.

    python -m bench.overload --name rpc_bound                   # light requests
    python -m bench.overload --name engine_bound --rows 64 --width 1024 --features 4096

1. Closed loop: ``--callers`` callers send one request each, back to back, for
   ``--seconds``: the sustainable rate R and its latency.
2. Open loop: requests arrive at ``--factor`` x R on a fixed schedule (they do
   not wait for answers, as traffic from many services does not) for
   ``--seconds``. Reports accepted and refused counts and the latency of each;
   anything other than OK or RESOURCE_EXHAUSTED counts as lost.

The worker runs with ``--max-queue-size`` = ``--queue``: an accepted request
waits behind at most that many, so its latency is bounded near
(queue + 2 x max_batch_size) / R, whatever the offered load, as long as the
engine is what saturates. Writes the run under ``--name`` into
``docs/bench/overload.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np

from bench.harness import OUT
from bench.loads import closed_loop, open_loop
from roundtrip.client.messages import build_request
from support.workers import serving_process

MAX_BATCH_SIZE = 32  # the worker's default, which this benchmark keeps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="rpc_bound", help="key of this run in the JSON file")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((args.rows, args.width)).astype(np.float32)
    body = build_request(1, x, args.features).SerializeToString()
    flags = (
        "--warmup-shapes",
        f"{args.width}:{args.features}",
        "--max-queue-size",
        str(args.queue),
        "--audit-fraction",
        "0",
    )
    with serving_process(*flags) as worker:
        port = worker.port
        asyncio.run(closed_loop(port, body, args.callers, 3.0))  # compiles the 2-D shapes
        sustained = asyncio.run(closed_loop(port, body, args.callers, args.seconds))
        rate = args.factor * sustained["requests_per_s"]
        overloaded = asyncio.run(open_loop(port, body, rate, args.seconds))
    result = {
        "request": {"x_shape": [args.rows, args.width], "features": args.features},
        "max_queue_size": args.queue,
        "closed_loop_callers": args.callers,
        "sustained": sustained,
        "factor": args.factor,
        "overloaded": overloaded,
        "predicted_latency_bound_ms": round(
            1000 * (args.queue + 2 * MAX_BATCH_SIZE) / sustained["requests_per_s"], 1
        ),
    }
    print(json.dumps(result, indent=2))
    path = OUT / "overload.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[args.name] = result
    path.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
