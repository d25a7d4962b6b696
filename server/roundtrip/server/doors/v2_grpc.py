"""``inference.GRPCInferenceService`` (V2) on the worker's gRPC server.

The same worker behind another door: ``ModelInfer`` turns its message into the pipeline's
requests through V2's mapping (:func:`~roundtrip.server.codecs.v2.unpack`), answers them in one
pipeline call and packs the answers (:func:`~roundtrip.server.codecs.v2.pack`), in the same
envelope, with the same admission by bytes, batcher, limits, audit, counters, drain
and status mapping as ``RoundTrip``. ``ready`` says whether the worker takes inference
calls now (self-checked, not draining): what ServerReady and ModelReady answer, and
grpc.health.v1 says too. The model's description is the
:class:`~roundtrip.server.codecs.v2_model.Model` the REST door formats too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from roundtrip.server.codecs import v2
from roundtrip.server.codecs.v2_model import Model
from roundtrip.server.doors.grpc_calls import Context, unary
from roundtrip.server.pipeline.calls import Call
from roundtrip.server.pipeline.pipeline import Pipeline
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb

SERVICE = v2pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class V2GrpcDoor:
    """The V2 gRPC methods over ``pipeline``, describing ``model``."""

    service = SERVICE.full_name

    def __init__(self, pipeline: Pipeline, model: Model, *, ready: Callable[[], bool]) -> None:
        self.pipeline = pipeline
        self.model = model
        self.ready = ready

    @unary()
    async def ModelInfer(  # noqa: N802 (the protocol's names)
        self, call: Call, request: v2pb.ModelInferRequest, context: Context
    ) -> v2pb.ModelInferResponse:
        self.model.check(request.model_name, request.model_version)
        pipeline = self.pipeline
        unpacked = v2.unpack(request, pipeline.limits, max_items=pipeline.max_batch_items)
        answers = await pipeline.answer_all(call, unpacked)
        return v2.pack(request, unpacked, answers)

    @unary(about_the_worker=True)
    async def ServerLive(  # noqa: N802
        self, call: Call, request: Any, context: Context
    ) -> v2pb.ServerLiveResponse:
        return v2pb.ServerLiveResponse(live=True)

    @unary(about_the_worker=True)
    async def ServerReady(  # noqa: N802
        self, call: Call, request: Any, context: Context
    ) -> v2pb.ServerReadyResponse:
        return v2pb.ServerReadyResponse(ready=self.ready())

    @unary(about_the_worker=True)
    async def ModelReady(  # noqa: N802
        self, call: Call, request: v2pb.ModelReadyRequest, context: Context
    ) -> v2pb.ModelReadyResponse:
        self.model.check(request.name, request.version)
        return v2pb.ModelReadyResponse(ready=self.ready())

    @unary(about_the_worker=True)
    async def ServerMetadata(  # noqa: N802
        self, call: Call, request: Any, context: Context
    ) -> v2pb.ServerMetadataResponse:
        return self.model.server_metadata()

    @unary(about_the_worker=True)
    async def ModelMetadata(  # noqa: N802
        self, call: Call, request: v2pb.ModelMetadataRequest, context: Context
    ) -> v2pb.ModelMetadataResponse:
        self.model.check(request.name, request.version)
        return self.model.metadata()

    @unary(about_the_worker=True)
    async def ModelConfig(  # noqa: N802
        self, call: Call, request: v2pb.ModelConfigRequest, context: Context
    ) -> v2pb.ModelConfigResponse:
        self.model.check(request.name, request.version)
        return v2pb.ModelConfigResponse(config=self.model.config_message())

    @unary(about_the_worker=True)
    async def ModelStatistics(  # noqa: N802
        self, call: Call, request: v2pb.ModelStatisticsRequest, context: Context
    ) -> v2pb.ModelStatisticsResponse:
        if request.name:  # none: every model, as Triton's extension says
            self.model.check(request.name, request.version)
        return self.model.statistics_message()

    def methods(self) -> dict[str, Callable[..., Any]]:
        """The handlers by method name, for ``grpc_calls.add_to_server``."""
        return {method.name: getattr(self, method.name) for method in SERVICE.methods}
