"""The model this worker serves, as the Open Inference Protocol (V2) describes it: one
:class:`Model` that both V2 doors format, gRPC as its messages and REST as their JSON, so
the two cannot drift apart (``tests/test_v2.py`` compares them field by field).

Metadata are protobuf messages, written to REST by :func:`as_json`; Triton's configuration
and statistics extensions are Triton's JSON, which the gRPC door parses into its messages.

>>> model = Model(max_batch_items=16, max_queue_delay_us=0, tally=InferenceTally())
>>> model.metadata().inputs[1].name, as_json(model.metadata())["inputs"][1]["shape"]
('x', [-1, -1])
>>> model.config()["max_batch_size"]
16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from roundtrip.server.errors import NotFound
from roundtrip.server.ops.tally import Duration, InferenceTally
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.wire.version import __version__

MODEL_NAME = "roundtrip"
MODEL_VERSION = "1"
SERVER_NAME = "roundtrip"
PLATFORM = "jax_flax_nnx"
#: Protocol extensions served: the REST binary tensor data extension, and Triton's model
#: configuration and statistics extensions.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
#: The datatypes x may arrive in (V2 lists one per tensor: FP32; the configuration names all).
X_DATATYPES = ("FP32", "FP64", "FP16", "BF16")


@dataclass(frozen=True, slots=True)
class Model:
    """The model served here: its name and version, tensors, Triton configuration (the
    worker's ``max_batch_items`` and queue delay) and statistics (the worker's counters)."""

    max_batch_items: int
    max_queue_delay_us: int
    tally: InferenceTally

    def check(self, name: str, version: str) -> None:
        """NOT_FOUND unless ``name`` (and ``version``, when given) is this model."""
        check_model(name, version)

    def server_metadata(self) -> v2pb.ServerMetadataResponse:
        return server_metadata()

    def metadata(self) -> v2pb.ModelMetadataResponse:
        return model_metadata()

    def config(self) -> dict[str, Any]:
        """Triton's configuration as its REST extension writes it (:meth:`config_message`:
        the same, as gRPC sends it)."""
        return model_config(
            max_batch_items=self.max_batch_items, max_queue_delay_us=self.max_queue_delay_us
        )

    def config_message(self) -> v2pb.ModelConfig:
        return json_format.ParseDict(self.config(), v2pb.ModelConfig())

    def statistics(self) -> dict[str, Any]:
        """Triton's statistics as its REST extension writes them (:meth:`statistics_message`:
        the same, as gRPC sends them)."""
        return model_statistics(self.tally)

    def statistics_message(self) -> v2pb.ModelStatisticsResponse:
        return json_format.ParseDict(self.statistics(), v2pb.ModelStatisticsResponse())


def as_json(message: Message) -> dict[str, Any]:
    """A metadata message as V2's REST protocol writes it: protobuf's JSON mapping with the
    fields' own names, and int64s as numbers (the mapping writes them as strings; V2's
    shapes are numbers)."""
    written: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _numbers(written, message)


def _numbers(value: dict[str, Any], message: Message) -> dict[str, Any]:
    """``value`` (``message`` as a dict) with its int64 fields as numbers again."""
    for field in message.DESCRIPTOR.fields:
        if field.name not in value:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # parameters: strings and numbers as V2 writes them already
        if field.message_type is not None:
            inner = getattr(message, field.name)
            if field.is_repeated:
                value[field.name] = [
                    _numbers(v, m) for v, m in zip(value[field.name], inner, strict=True)
                ]
            else:
                value[field.name] = _numbers(value[field.name], inner)
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            raw = value[field.name]
            value[field.name] = [int(v) for v in raw] if isinstance(raw, list) else int(raw)
    return value


def check_model(name: str, version: str) -> None:
    """NOT_FOUND unless ``name`` (and ``version``, when given) is the model served here."""
    if name != MODEL_NAME:
        raise NotFound(f"unknown model {name!r}: this worker serves {MODEL_NAME!r}")
    if version not in ("", MODEL_VERSION):
        raise NotFound(
            f"unknown version {version!r} of model {MODEL_NAME!r}: it has version {MODEL_VERSION!r}"
        )


def server_metadata() -> v2pb.ServerMetadataResponse:
    return v2pb.ServerMetadataResponse(
        name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
    )


def model_metadata() -> v2pb.ModelMetadataResponse:
    """The tensors in their batched form, as V2 (and Triton's configuration, below) declare
    them: B requests per call, seed and features ``[B, 1]`` (``[B]`` is accepted too), x
    ``[B, width]`` (-1: any size). V2 lists one datatype per tensor: x is FP32 here, and
    FP64, FP16 and BF16 are accepted too (the configuration's ``x_datatypes`` says so);
    x of higher rank (``[B, ..., width]``) is accepted as well."""
    tensor = v2pb.ModelMetadataResponse.TensorMetadata
    return v2pb.ModelMetadataResponse(
        name=MODEL_NAME,
        versions=[MODEL_VERSION],
        platform=PLATFORM,
        inputs=[
            tensor(name="seed", datatype="INT64", shape=[-1, 1]),
            tensor(name="x", datatype="FP32", shape=[-1, -1]),
            tensor(name="features", datatype="INT64", shape=[-1, 1]),
        ],
        outputs=[
            tensor(name="result", datatype="FP32", shape=[-1, 3]),
            tensor(name="orig_out", datatype="FP32", shape=[-1, -1]),
            tensor(name="merged_out", datatype="FP32", shape=[-1, -1]),
        ],
    )


def model_config(*, max_batch_items: int, max_queue_delay_us: int) -> dict[str, Any]:
    """Triton's model configuration of this model, as Triton's REST extension writes it (the
    gRPC one parses the same into ``ModelConfig``): batched (``max_batch_size`` is
    ``max_batch_items``, and dims leave the batch axis out), the tensors of
    :func:`model_metadata`, the worker's queue delay.

    >>> model_config(max_batch_items=16, max_queue_delay_us=0)["input"][1]
    {'name': 'x', 'data_type': 'TYPE_FP32', 'dims': [-1]}
    """
    return {
        "name": MODEL_NAME,
        "platform": PLATFORM,
        "backend": "jax",
        "max_batch_size": max_batch_items,
        "input": [
            {"name": "seed", "data_type": "TYPE_INT64", "dims": [1]},
            {"name": "x", "data_type": "TYPE_FP32", "dims": [-1]},
            {"name": "features", "data_type": "TYPE_INT64", "dims": [1]},
        ],
        "output": [
            {"name": "result", "data_type": "TYPE_FP32", "dims": [3]},
            {"name": "orig_out", "data_type": "TYPE_FP32", "dims": [-1]},
            {"name": "merged_out", "data_type": "TYPE_FP32", "dims": [-1]},
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
        "parameters": {
            "x_datatypes": {"string_value": ",".join(X_DATATYPES)},
            "x_rank": {"string_value": "any >= 1 beside the batch axis; the last is the width"},
        },
    }


def model_statistics(tally: InferenceTally) -> dict[str, Any]:
    """Triton's statistics extension for this model, from the worker's own counters.

    >>> model_statistics(InferenceTally())["model_stats"][0]["inference_count"]
    0
    """

    def duration(value: Duration) -> dict[str, int]:
        return {"count": value.count, "ns": value.ns}

    def computed(value: Duration) -> dict[str, dict[str, int]]:
        """Triton splits compute in three with equal counts; the engine's time is all one
        step here (inputs and outputs are moved inside it), so the other two take 0 ns."""
        untimed = {"count": value.count, "ns": 0}
        return {
            "compute_input": untimed,
            "compute_infer": duration(value),
            "compute_output": untimed,
        }

    return {
        "model_stats": [
            {
                "name": MODEL_NAME,
                "version": MODEL_VERSION,
                "last_inference": tally.last_inference_ms,
                "inference_count": tally.inference_count,
                "execution_count": tally.execution_count,
                "inference_stats": {
                    "success": duration(tally.success),
                    "fail": duration(tally.fail),
                    "queue": duration(tally.queue),
                    **computed(tally.compute_infer),
                },
                "batch_stats": [
                    {"batch_size": size, **computed(tally.batches[size])}
                    for size in sorted(tally.batches)
                ],
            }
        ]
    }
