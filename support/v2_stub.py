"""The V2 gRPC service as a client calls it: ``inference.GRPCInferenceService``'s methods on
a channel, typed by the worker's own V2 messages.

The V2 proto is compiled for its messages only (its generated gRPC module would import
the messages as a top-level module, outside the worker's package), so tests and
benchmarks call its methods through this one helper, not through channels built by hand.

>>> import grpc
>>> with grpc.insecure_channel("127.0.0.1:1") as channel:
...     callable(V2Stub(channel).ModelInfer)
True
"""

from __future__ import annotations

from typing import Any

import grpc

from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb

SERVICE = v2pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class V2Stub:
    """Every method of the V2 service on ``channel``, by its name (``stub.ModelInfer(...)``,
    ``stub.ModelInfer.future(...)``). ``ModelInferBytes`` sends an already serialized
    ``ModelInferRequest`` (a message the client's protobuf would not build)."""

    def __init__(self, channel: grpc.Channel) -> None:
        for method in SERVICE.methods:
            request = getattr(v2pb, method.input_type.name)
            response = getattr(v2pb, method.output_type.name)
            setattr(self, method.name, _method(channel, method.name, request, response))
        self.ModelInferBytes = channel.unary_unary(
            f"/{SERVICE.full_name}/ModelInfer",
            request_serializer=lambda data: data,
            response_deserializer=v2pb.ModelInferResponse.FromString,
        )

    def __getattr__(self, name: str) -> Any:  # the methods set above, for the type checker
        raise AttributeError(name)


def _method(
    channel: grpc.Channel, name: str, request: Any, response: Any
) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
    return channel.unary_unary(
        f"/{SERVICE.full_name}/{name}",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )
