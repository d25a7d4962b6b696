"""Memory under long varied traffic: RSS after warm-up against RSS after N requests.

    python -m bench.memory --requests 100000 --shapes 50

Starts a worker whose warm-up compiles the shapes it will serve, reads its RSS
(``/proc/PID/status``) once it serves, sends a first pass of a tenth of the
traffic, reads RSS again, then sends
``--requests`` requests over ``--shapes`` distinct shape signatures through
RoundTripStream (so the compiled-executable cache turns over: 50 shapes times
the batch buckets is more than ``max_compiled``), checks every answer against
the engine run in this process (bit-identical to the eager reference, as the
test suite shows), and reads RSS again. The issue's target is a ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator

import numpy as np

from bench.harness import OUT
from roundtrip.client.messages import build_request
from roundtrip.server.engine.engine import Engine
from roundtrip.server.values import RoundTripInput
from roundtrip.v1 import roundtrip_pb2 as pb
from support.workers import serving_process


def shapes(count: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(1)
    return [(int(rng.integers(1, 200)), int(rng.integers(1, 200))) for _ in range(count)]


async def drive(
    port: int, requests: list[pb.RoundTripRequest], expected: list[tuple[float, ...]]
) -> int:
    import grpc

    from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)

        async def messages() -> AsyncIterator[pb.RoundTripStreamRequest]:
            for index, request in enumerate(requests):
                yield pb.RoundTripStreamRequest(id=index, request=request)

        wrong = 0
        async for response in stub.RoundTripStream(messages(), timeout=3600):
            r = response.response
            if (
                response.HasField("error")
                or (r.orig_sum, r.merged_sum, r.max_abs_diff) != expected[response.id]
            ):
                wrong += 1
        return wrong


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--shapes", type=int, default=50)
    parser.add_argument(
        "--max-compiled", type=int, default=512, help="the worker's executable cache bound"
    )
    args = parser.parse_args()
    pairs = shapes(args.shapes)
    engine = Engine(max_compiled=4 * len(pairs), max_batch_size=1)
    rng = np.random.default_rng(2)
    pool = []
    for width, features in pairs:  # 8 distinct requests per shape, reused round-robin
        for _ in range(8):
            item = RoundTripInput(
                int(rng.integers(-(2**62), 2**62)),
                rng.standard_normal(width).astype(np.float32),
                features,
            )
            r = engine.run([item])[0]
            pool.append(
                (
                    build_request(item.seed, item.x, features),
                    (r.orig_sum, r.merged_sum, r.max_abs_diff),
                )
            )
    order = [pool[(i * 8 + (i // len(pairs)) % 8) % len(pool)] for i in range(args.requests)]
    first_pass = order[: args.requests // 10]
    # The worker warms up the shapes it will serve, as an operator configures it to.
    warmup = ",".join(f"{width}:{features}" for width, features in pairs)
    flags = ("--warmup-shapes", warmup, "--max-compiled", str(args.max_compiled))
    with serving_process(*flags) as worker:
        port = worker.port
        warm = worker.rss_mib()
        wrong = asyncio.run(drive(port, [o[0] for o in first_pass], [o[1] for o in first_pass]))
        traffic_warm = worker.rss_mib()
        started = time.perf_counter()
        wrong += asyncio.run(drive(port, [o[0] for o in order], [o[1] for o in order]))
        seconds = time.perf_counter() - started
        after = worker.rss_mib()
    result = {
        "requests": args.requests,
        "shapes": args.shapes,
        "max_compiled": args.max_compiled,
        "rss_after_startup_warmup_mib": round(warm, 1),
        "rss_after_first_pass_mib": round(traffic_warm, 1),
        "rss_after_requests_mib": round(after, 1),
        "ratio_to_startup": round(after / warm, 3),
        "ratio_to_first_pass": round(after / traffic_warm, 3),
        "wrong_answers": wrong,
        "seconds_for_requests": round(seconds, 1),
    }
    print(json.dumps(result))
    (OUT / "memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
