"""``inference.GRPCInferenceService`` (V2) on the worker's gRPC server, and :meth:`infer`, the
one V2 request path that the REST endpoint (:mod:`roundtrip.server.rest`) also takes.

It is the same worker behind another door: the same admission by bytes, batcher, limits,
audit, counters, drain and status mapping as ``RoundTrip`` (:mod:`roundtrip.server.service`);
only the wire mapping (:mod:`roundtrip.server.v2`) is V2's own. A call of B requests fails as
a whole with the status of its first failing request, which the message names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from roundtrip.server import v2
from roundtrip.server.admission import Reservation
from roundtrip.server.batcher import Gathering, Ticket
from roundtrip.server.errors import RequestError
from roundtrip.server.service import (
    Received,
    RoundTripServicer,
    deadline_of,
    rpc_errors,
    status_errors,
)
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.server.values import RoundTripAnswer

SERVICE = v2pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer:
    """Implements the V2 methods over a :class:`RoundTripServicer`'s admission and counters.

    ``ready`` says whether the worker takes inference calls now (self-checked, not
    draining): what ServerReady and ModelReady answer, and grpc.health.v1 says too.
    """

    def __init__(self, core: RoundTripServicer, *, ready: Callable[[], bool]) -> None:
        self.metrics = core.metrics
        self.calls = core.calls
        self.budget = core.budget
        self._core = core
        self.ready = ready

    def fingerprint(self) -> str:
        return self._core.fingerprint()

    async def infer(
        self, request: v2pb.ModelInferRequest, deadline: float | None
    ) -> tuple[v2pb.ModelInferResponse, list[Reservation]]:
        """Answer every request of the call, exactly as each would be answered alone.

        Returns the response and the answers' reservations, which the transport releases once
        the response is written.
        """
        core = self._core
        call = v2.unpack(request, core.limits, max_items=core.max_batch_items)
        queued: list[tuple[Reservation, Ticket]] = []
        gathering = Gathering()  # outcomes, errors included, are read back by _answers
        try:
            for index, (item, size) in enumerate(call.items):
                try:
                    queued.append(core.admit(item, size, deadline, gathering))
                except RequestError as error:
                    raise call.about(index, error) from None
            await gathering.wait()
            answers = self._answers(call, queued)
        except BaseException:
            core.abandon(queued)
            raise
        response = v2.pack(request, call, answers)
        for (item, _), answer, (held, _) in zip(call.items, answers, queued, strict=True):
            core.settle(item, answer, held)
        return response, [held for held, _ in queued]

    @staticmethod
    def _answers(
        call: v2.Call, queued: Sequence[tuple[Reservation, Ticket]]
    ) -> list[RoundTripAnswer]:
        answers = []
        for index, (_, ticket) in enumerate(queued):
            error = ticket.future.exception()
            if isinstance(error, RequestError):
                raise call.about(index, error)
            answers.append(ticket.future.result())  # re-raises anything else (a bug: INTERNAL)
        return answers

    @rpc_errors
    async def ModelInfer(  # noqa: N802 (the protocol's names)
        self, received: Received, context: Context
    ) -> v2pb.ModelInferResponse:
        response, held = await self.infer(received.message, deadline_of(context))
        self._core.release_when_sent(context, held)
        return response

    @status_errors
    async def ServerLive(  # noqa: N802
        self, received: Received, context: Context
    ) -> v2pb.ServerLiveResponse:
        return v2pb.ServerLiveResponse(live=True)

    @status_errors
    async def ServerReady(  # noqa: N802
        self, received: Received, context: Context
    ) -> v2pb.ServerReadyResponse:
        return v2pb.ServerReadyResponse(ready=self.ready())

    @status_errors
    async def ModelReady(  # noqa: N802
        self, received: Received, context: Context
    ) -> v2pb.ModelReadyResponse:
        message: v2pb.ModelReadyRequest = received.message
        v2.check_model(message.name, message.version)
        return v2pb.ModelReadyResponse(ready=self.ready())

    @status_errors
    async def ServerMetadata(  # noqa: N802
        self, received: Received, context: Context
    ) -> v2pb.ServerMetadataResponse:
        return v2.server_metadata()

    @status_errors
    async def ModelMetadata(  # noqa: N802
        self, received: Received, context: Context
    ) -> v2pb.ModelMetadataResponse:
        message: v2pb.ModelMetadataRequest = received.message
        v2.check_model(message.name, message.version)
        return v2.model_metadata()
