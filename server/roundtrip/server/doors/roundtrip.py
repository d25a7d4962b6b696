"""``roundtrip.v1.RoundTripService``'s unary methods: ``RoundTrip``, ``RoundTripBatch`` and
``GetServerInfo``. Each converts its messages and leaves the work to the pipeline.

Registered from the service descriptor (``grpc_calls.add_to_server``), so the methods take
what the tolerant parser hands over, wrapped by :func:`~roundtrip.server.doors.grpc_calls.unary`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from roundtrip.server.codecs.codec import answer_wire_bytes, encode_result, weighed
from roundtrip.server.doors.grpc_calls import Context, dropped_code, unary
from roundtrip.server.errors import Failure, LimitExceeded, failure_of
from roundtrip.server.pipeline.admission import WorkingSet
from roundtrip.server.pipeline.calls import Call
from roundtrip.server.pipeline.pipeline import Pipeline
from roundtrip.server.values import RoundTripAnswer, RoundTripInput
from roundtrip.v1 import roundtrip_pb2 as pb


class RoundTripDoor:
    """The unary methods of ``roundtrip.v1.RoundTripService`` over ``pipeline``; ``info``
    is what GetServerInfo answers (its numerics fingerprint filled in once known)."""

    service = pb.DESCRIPTOR.services_by_name["RoundTripService"].full_name

    def __init__(self, pipeline: Pipeline, info: pb.GetServerInfoResponse) -> None:
        self.pipeline = pipeline
        self.info = info

    def methods(self) -> dict[str, Callable[..., Any]]:
        """The handlers by method name, for ``grpc_calls.add_to_server``."""
        return {
            "RoundTrip": self.RoundTrip,
            "RoundTripBatch": self.RoundTripBatch,
            "GetServerInfo": self.GetServerInfo,
        }

    @unary()
    async def RoundTrip(  # noqa: N802 (the generated servicer's name)
        self, call: Call, request: pb.RoundTripRequest, context: Context
    ) -> pb.RoundTripResponse:
        pipeline = self.pipeline
        size, decode_request = weighed(request, pipeline.limits, message_bytes=call.message_bytes)
        pipeline.check_answer_size(answer_wire_bytes(size))
        return encode_result(await call.answer(size, decode_request))

    @unary(counts=False)
    async def RoundTripBatch(  # noqa: N802
        self, call: Call, batch: pb.RoundTripBatchRequest, context: Context
    ) -> pb.RoundTripBatchResponse:
        """Answer every request of the message as if each came alone; outcomes in order.

        Each item is weighed on its own, so one bad item gets its own error while the others
        are answered; items in a row that weigh the same are admitted, decoded and queued as
        one group (:class:`~roundtrip.server.pipeline.many.Many`) and join the per-shape
        batches with all other traffic: no task, coroutine or queue entry per item. Items
        are counted one by one, by the code each ended with.
        """
        pipeline = self.pipeline
        count = len(batch.requests)
        if count > pipeline.max_batch_items:
            raise LimitExceeded(
                f"a RoundTripBatch holds {count} requests, over this worker's limit of "
                f"{pipeline.max_batch_items} (max_batch_items, env ROUNDTRIP_MAX_BATCH_ITEMS)"
            )
        started = time.perf_counter()
        outcomes: list[Failure | RoundTripAnswer | None] = [None] * count
        weighed_items: list[tuple[int, WorkingSet, Callable[[], RoundTripInput]]] = []
        for index, request in enumerate(batch.requests):
            try:
                size, decode_item = weighed(
                    request, pipeline.limits, message_bytes=call.message_bytes
                )
                weighed_items.append((index, size, decode_item))
            except Exception as error:
                outcomes[index] = failure_of(error)
        pipeline.check_answer_size(
            batch_answer_bytes(outcomes, [size for _, size, _ in weighed_items])
        )
        pipeline.metrics.inflight.inc(count)
        try:
            many = pipeline.many(call)
            many.admit([(size, decode_item) for _, size, decode_item in weighed_items])
            answers = await many.outcomes()
        except asyncio.CancelledError:
            code = dropped_code(context).name
            pipeline.metrics.observe_rpcs("RoundTripBatch", [code] * count, started)
            raise
        finally:
            pipeline.metrics.inflight.dec(count)
        for (index, _, _), answer in zip(weighed_items, answers, strict=True):
            if answer is None:  # not all or nothing: every request settles
                answer = RuntimeError("a request of the batch was never answered")
            outcomes[index] = failure_of(answer) if isinstance(answer, Exception) else answer
        return self._response(outcomes, started)

    def _response(
        self, outcomes: list[Failure | RoundTripAnswer | None], started: float
    ) -> pb.RoundTripBatchResponse:
        """The outcomes in order, each item counted by its code."""
        response = pb.RoundTripBatchResponse()
        codes = []
        for outcome in outcomes:
            slot = response.outcomes.add()
            if isinstance(outcome, Failure):
                slot.error.code, slot.error.message = outcome.code.value[0], outcome.message
                codes.append(outcome.code.name)
            elif outcome is not None:
                encode_result(outcome, slot.response)
                codes.append("OK")
        self.pipeline.metrics.observe_rpcs("RoundTripBatch", codes, started)
        return response

    @unary(about_the_worker=True)
    async def GetServerInfo(  # noqa: N802
        self, call: Call, request: Any, context: Context
    ) -> pb.GetServerInfoResponse:
        return self.info


def batch_answer_bytes(
    refused: list[Failure | RoundTripAnswer | None], sizes: list[WorkingSet]
) -> int:
    """An upper bound of a ``RoundTripBatchResponse``'s bytes on the wire: each answer's
    (:func:`~roundtrip.server.codecs.codec.answer_wire_bytes`), each refusal's message, and the
    tags around each outcome."""
    errors = sum(len(outcome.message) + 16 for outcome in refused if isinstance(outcome, Failure))
    return errors + sum(answer_wire_bytes(size) + 8 for size in sizes)
