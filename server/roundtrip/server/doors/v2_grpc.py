"""``inference.GRPCInferenceService`` (V2) on the worker's gRPC server.

The same worker behind another door: ``ModelInfer`` turns its message into the pipeline's
requests through V2's mapping (:func:`roundtrip.server.v2.answer`) and is answered in the
same envelope, with the same admission by bytes, batcher, limits, audit, counters, drain
and status mapping as ``RoundTrip``. ``ready`` says whether the worker takes inference
calls now (self-checked, not draining): what ServerReady and ModelReady answer, and
grpc.health.v1 says too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from roundtrip.server import v2
from roundtrip.server.calls import Call
from roundtrip.server.grpc_calls import Context, unary
from roundtrip.server.pipeline import Pipeline
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb

SERVICE = v2pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class V2GrpcDoor:
    """The V2 gRPC methods over ``pipeline``."""

    def __init__(self, pipeline: Pipeline, *, ready: Callable[[], bool]) -> None:
        self.pipeline = pipeline
        self.ready = ready

    @unary()
    async def ModelInfer(  # noqa: N802 (the protocol's names)
        self, call: Call, request: v2pb.ModelInferRequest, context: Context
    ) -> v2pb.ModelInferResponse:
        return await v2.answer(call, request, self.pipeline)

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
        v2.check_model(request.name, request.version)
        return v2pb.ModelReadyResponse(ready=self.ready())

    @unary(about_the_worker=True)
    async def ServerMetadata(  # noqa: N802
        self, call: Call, request: Any, context: Context
    ) -> v2pb.ServerMetadataResponse:
        return v2.server_metadata()

    @unary(about_the_worker=True)
    async def ModelMetadata(  # noqa: N802
        self, call: Call, request: v2pb.ModelMetadataRequest, context: Context
    ) -> v2pb.ModelMetadataResponse:
        v2.check_model(request.name, request.version)
        return v2.model_metadata()

    @unary(about_the_worker=True)
    async def ModelConfig(  # noqa: N802
        self, call: Call, request: v2pb.ModelConfigRequest, context: Context
    ) -> v2pb.ModelConfigResponse:
        v2.check_model(request.name, request.version)
        config = v2.model_config(self.pipeline)
        return v2pb.ModelConfigResponse(config=json_format.ParseDict(config, v2pb.ModelConfig()))

    @unary(about_the_worker=True)
    async def ModelStatistics(  # noqa: N802
        self, call: Call, request: v2pb.ModelStatisticsRequest, context: Context
    ) -> v2pb.ModelStatisticsResponse:
        if request.name:  # none: every model, as Triton's extension says
            v2.check_model(request.name, request.version)
        statistics = v2.model_statistics(self.pipeline.metrics.tally)
        return json_format.ParseDict(statistics, v2pb.ModelStatisticsResponse())

    def methods(self) -> dict[str, Callable[..., Any]]:
        """The handlers by method name, for ``grpc_calls.add_to_server``."""
        return {method.name: getattr(self, method.name) for method in SERVICE.methods}
