"""The two comparison servers of the benchmark, both serving roundtrip.v1.RoundTripService.

* ``empty``: answers every RoundTrip with a constant response at once, and every
  request of a RoundTripBatch the same way (the message parsed, one outcome per item).
  It is the ceiling of a Python grpc.aio server on this machine, unary and batched.
* ``naive``: runs SPEC.md's eager reference per request on one compute thread,
  as the worker's predecessors did.
* ``engine``: the worker's engine (batched programs proven bit-exact, the parameter cache)
  under the thinnest RoundTripBatch handler: each item's ``x`` read as it is, no checks,
  admission, batcher, metrics or audit, the message's items through ``Engine.run`` in
  batches of the worker's default ``max_batch_size`` on one compute thread, the three
  numbers written straight into the answer.
  It serves RoundTripBatch only, and is the ceiling of any design of the bulk path around
  this engine: what is left when every step the worker adds costs nothing.

    python -m bench.servers empty --port 50061
    python -m bench.servers empty --event-loop uvloop   # the same handler on the worker's loop
    python -m bench.servers engine --port 50063
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from roundtrip.server.ops.eventloop import EVENT_LOOPS, loop_factory
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

CONSTANT = pb.RoundTripResponse(orig_sum=1.0, merged_sum=1.0, max_abs_diff=0.0)


class EmptyServicer(pb_grpc.RoundTripServiceServicer):
    async def RoundTrip(self, request: Any, context: Any) -> pb.RoundTripResponse:  # noqa: N802
        return CONSTANT

    async def RoundTripBatch(  # noqa: N802
        self, request: pb.RoundTripBatchRequest, context: Any
    ) -> pb.RoundTripBatchResponse:
        response = pb.RoundTripBatchResponse()
        for _ in request.requests:
            response.outcomes.add().response.CopyFrom(CONSTANT)
        return response


class NaiveServicer(pb_grpc.RoundTripServiceServicer):
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1)

    @staticmethod
    def _eager(request: pb.RoundTripRequest) -> pb.RoundTripResponse:
        from roundtrip.server.numerics.reference import eager_round_trip
        from roundtrip.wire import arrays

        result = eager_round_trip(
            request.seed, arrays.from_proto(request.x, field="x"), request.features
        )
        return pb.RoundTripResponse(
            orig_sum=result.orig_sum,
            merged_sum=result.merged_sum,
            max_abs_diff=result.max_abs_diff,
        )

    async def RoundTrip(self, request: Any, context: Any) -> pb.RoundTripResponse:  # noqa: N802
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._eager, request)


class EngineOnlyServicer(pb_grpc.RoundTripServiceServicer):
    """RoundTripBatch straight through the worker's engine (``engine`` above)."""

    def __init__(self) -> None:
        from bench.engine import engine
        from roundtrip.server.config import WorkerConfig

        self._batch = WorkerConfig().max_batch_size
        self._engine = engine(batched=True, max_batch_size=self._batch)
        self._executor = ThreadPoolExecutor(1)

    def _compute(self, items: list[Any]) -> list[Any]:
        size = self._batch
        return [
            a for at in range(0, len(items), size) for a in self._engine.run(items[at : at + size])
        ]

    async def RoundTripBatch(  # noqa: N802
        self, request: pb.RoundTripBatchRequest, context: Any
    ) -> pb.RoundTripBatchResponse:
        import numpy as np

        from roundtrip.server.values import RoundTripInput
        from roundtrip.wire.arrays import NUMPY_DTYPES

        items = [
            RoundTripInput(r.seed, np.frombuffer(r.x.raw, NUMPY_DTYPES[r.x.dtype]), r.features)
            for r in request.requests
        ]
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(self._executor, self._compute, items)
        response = pb.RoundTripBatchResponse()
        for answer in answers:
            out = response.outcomes.add().response
            out.orig_sum = answer.orig_sum
            out.merged_sum = answer.merged_sum
            out.max_abs_diff = answer.max_abs_diff
        return response


SERVICERS = {"empty": EmptyServicer, "naive": NaiveServicer, "engine": EngineOnlyServicer}


async def serve(kind: str, port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    # Each serves some methods and leaves the others to the base class (UNIMPLEMENTED),
    # which the generated stub declares abstract.
    servicer = SERVICERS[kind]()  # type: ignore[abstract]
    pb_grpc.add_RoundTripServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(json.dumps({"event": "listening", "port": bound}), file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(SERVICERS))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        runner.run(serve(args.kind, args.port))


if __name__ == "__main__":
    main()
