"""The benchmark's comparison servers: the engine under the thinnest handler, which
docs/benchmarks.md quotes as the ceiling of the bulk path, computes what the worker does."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from reference import reference

from bench.servers import EngineOnlyServicer
from roundtrip.client.messages import build_request
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc


def test_the_engine_only_server_answers_each_item_of_a_batch_with_eagers_bits() -> None:
    rng = np.random.default_rng(3)
    # 70 items: engine batches of max_batch_size (32, 32 and 6), seeds new and repeated
    cases = [(int(rng.integers(0, 5)) * 7919, rng.standard_normal(3), 4) for _ in range(70)]
    batch = pb.RoundTripBatchRequest(
        requests=[
            build_request(seed, x.astype(np.float32), features) for seed, x, features in cases
        ]
    )

    async def call() -> pb.RoundTripBatchResponse:
        server = grpc.aio.server()
        pb_grpc.add_RoundTripServiceServicer_to_server(EngineOnlyServicer(), server)  # type: ignore[abstract]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RoundTripServiceStub(channel)
                response: pb.RoundTripBatchResponse = await stub.RoundTripBatch(batch, timeout=120)
                return response
        finally:
            await server.stop(None)

    response = asyncio.run(call())
    assert len(response.outcomes) == len(cases)
    for outcome, (seed, x, features) in zip(response.outcomes, cases, strict=True):
        got = outcome.response
        want = reference(seed, x.astype(np.float32), features)
        assert np.array_equal([got.orig_sum, got.merged_sum, got.max_abs_diff], want)
