"""Many RoundTrip calls in flight from one asyncio client.

python examples/async_unary.py [target]
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from roundtrip.client import AsyncRoundTripClient


async def main(target: str) -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    async with AsyncRoundTripClient(target, timeout=30) as client:
        results = await asyncio.gather(*(client.round_trip(seed, x, 64) for seed in range(100)))
    print(len(results), "answers; seed 0:", results[0].as_list())
    assert all(result.max_abs_diff == 0.0 for result in results)


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
