"""What a request costs the event loop in the batcher's own Python, with nothing computed.

    python -m bench.batcher_cost   # prints us per request; docs/benchmarks.md quotes it

In-process on uvloop, 128 coroutines await ``Batcher.submit`` for a W2 request, 300
times each, with the batcher as shipped but each batch answered from a memo in its own
task (``bench.ladder``'s ``no hand-off``); beside them, 128 coroutines that build the
same request and yield once (``asyncio.sleep(0)``): the least a call that waits can
cost. Alternating, twice each; no gRPC here.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np

from bench import ladder
from roundtrip.server.batcher import Batcher, Lane
from roundtrip.server.engine import Engine, RoundTripInput
from roundtrip.server.eventloop import loop_factory

CALLERS, CALLS = 128, 300


async def per_request_us(waits_on_batcher: bool) -> float:
    engine = Engine(max_compiled=8, max_batch_size=32, max_param_cache_bytes=1 << 26)
    batcher = Batcher(
        [Lane(engine, None)],  # type: ignore[arg-type]  # no thread: batches stay on the loop
        max_batch_size=32,
        max_queue_delay_us=0,
        max_queue_size=CALLERS,
    )
    batcher.start()
    x = np.ones(64, np.float32)
    await batcher.submit(RoundTripInput(0, x, 64))  # computed once, then remembered

    async def caller() -> None:
        for _ in range(CALLS):
            item = RoundTripInput(0, x, 64)
            if waits_on_batcher:
                await batcher.submit(item)
            else:
                await asyncio.sleep(0)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    elapsed = time.perf_counter() - started
    await batcher.drain()
    return elapsed / (CALLERS * CALLS) * 1e6


def main() -> None:
    ladder.alter("no hand-off")
    runs: dict[str, list[float]] = {"batcher": [], "yield once": []}
    for _ in range(2):
        for name, waits in (("yield once", False), ("batcher", True)):
            with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
                runs[name].append(runner.run(per_request_us(waits)))
    for name, values in runs.items():
        print(f"{name}: {statistics.median(values):.1f} us per request ({values})")


if __name__ == "__main__":
    main()
