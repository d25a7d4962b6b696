"""Every local device is a compute lane: batches run on all of them, each bit-identical.

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` gives the worker two
devices, as a GPU pod with two GPUs or a TPU host would.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from reference import reference

from roundtrip.client import AsyncRoundTripClient, RoundTripResult
from support.workers import WorkerProcess

TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

pytestmark = pytest.mark.slow


def test_a_worker_runs_batches_on_every_device_and_each_answer_is_exact() -> None:
    worker = WorkerProcess(
        "--warmup-shapes", "64:64,255:256", "--max-batch-size", "4", env=TWO_DEVICES
    )
    try:
        worker.wait_serving()
        starting = next(e for e in worker.events if e["event"] == "starting")
        assert len(starting["lanes"]) == 2  # one per device, named for it
        rng = np.random.default_rng(2)
        cases = [
            (seed % 40, rng.standard_normal(shape).astype(np.float32), features)
            for seed, (shape, features) in enumerate(
                [((64,), 64), ((255,), 256), ((2, 64), 64), ((3,), 4)] * 40
            )
        ]

        async def call_all() -> list[object]:
            async with AsyncRoundTripClient(worker.target, timeout=120) as client:
                info = await client.server_info()
                assert (info.compute_lanes, len(info.devices)) == (2, 2)
                return await asyncio.gather(*(client.round_trip(*case) for case in cases))

        outcomes = asyncio.run(call_all())
        for outcome, case in zip(outcomes, cases, strict=True):
            assert isinstance(outcome, RoundTripResult)
            assert np.array_equal(outcome.as_list(), reference(*case))
        text = worker.scrape()
        lanes = [line for line in text.splitlines() if line.startswith("roundtrip_lane_requests")]
        assert len(lanes) == 2
        served = [float(line.split()[-1]) for line in lanes]
        assert all(count > 0 for count in served), lanes  # both lanes took work
        assert sum(served) >= len(cases)
        assert worker.terminate() == 0
    finally:
        worker.kill()
