"""The Open Inference Protocol (V2, KServe's protocol) for roundtrip: the mapping between a
``ModelInferRequest`` and the pipeline's requests, and the answers packed back. No I/O here;
the model's description is :mod:`~roundtrip.server.codecs.v2_model`'s.

Both V2 doors arrive as a ``ModelInferRequest`` (REST's JSON and binary data become one
through :mod:`~roundtrip.server.codecs.v2_json`), so there is one mapping (:func:`unpack`,
:func:`pack`), and it ends in the same :class:`RoundTripInput` and
:func:`~roundtrip.server.pipeline.validation.weigh_shape` limits as ``RoundTrip``. Inputs:
``seed`` (INT64), ``x`` (FP32, FP64, FP16 or BF16; rank >= 1; the last axis is the input
width) and ``features`` (INT64). When ``seed``
has B > 1 elements, the call holds B requests: request i is ``seed[i]``, ``x[i]`` (x's
first axis is B) and ``features[i]`` (or one shared ``features``); each is answered
exactly as if sent alone. Outputs: ``result`` (FP32, one row ``[orig_sum, merged_sum,
max_abs_diff]`` per request), and ``orig_out`` / ``merged_out`` only when asked for (with
a leading axis B when B > 1).

>>> request = v2pb.ModelInferRequest(model_name="roundtrip")
>>> for name, value in (("seed", 0), ("features", 4)):
...     tensor = request.inputs.add(name=name, datatype="INT64", shape=[1])
...     tensor.contents.int64_contents[:] = [value]
>>> x = request.inputs.add(name="x", datatype="FP32", shape=[3])
>>> x.contents.fp32_contents[:] = [1.0, 2.0, 3.0]
>>> call = unpack(request, RequestLimits(1 << 20, 1 << 16, 1 << 28, 1 << 20), max_items=8)
>>> item = call.item(0)
>>> item.seed, item.x.tolist(), item.features, call.outputs
(0, [1.0, 2.0, 3.0], 4, ('result',))
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from roundtrip.server.codecs.v2_model import MODEL_NAME, MODEL_VERSION, X_DATATYPES
from roundtrip.server.errors import InvalidArgument, LimitExceeded, RequestError
from roundtrip.server.pipeline.admission import WorkingSet
from roundtrip.server.pipeline.validation import MAX_RANK, RequestLimits, weigh_shape
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.server.values import RoundTripAnswer, RoundTripInput

#: V2 datatype -> little-endian numpy dtype, for every datatype a tensor may arrive in
#: (the REST layer decodes JSON data with it); x takes only the floating ones.
NUMPY_OF: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: Most dimensions any tensor's shape may declare (numpy's own limit); x's own limit is the
#: worker's ``max_x_rank``.
MAX_TENSOR_RANK = MAX_RANK
DATATYPE_OF = {dtype.name: name for name, dtype in NUMPY_OF.items()}
INPUTS = ("seed", "x", "features")
OUTPUTS = ("result", "orig_out", "merged_out")
DEFAULT_OUTPUTS = ("result",)
RESULT_ROW = struct.Struct("<3f")


@dataclass(slots=True)
class Unpacked:
    """A ``ModelInferRequest`` unpacked: its requests, each weighed (its working set), the
    outputs asked for, and x, decoded only when the first admitted request needs it.
    ``batched``: B > 1, so request i is row i of x, and outputs get a leading axis B."""

    seeds: Sequence[int]
    features: Sequence[int]
    sizes: Sequence[WorkingSet]
    outputs: tuple[str, ...]
    batched: bool
    row_shape: tuple[int, ...]
    _x: Callable[[], npt.NDArray[Any]]
    _decoded: npt.NDArray[Any] | None = None

    def about(self, index: int, error: RequestError) -> RequestError:
        """``error`` for request ``index`` of this call (:func:`naming_the_request`)."""
        return naming_the_request(self.batched, index, error)

    def item(self, index: int) -> RoundTripInput:
        """Request ``index`` (x is decoded once, when the first one is admitted)."""
        if self._decoded is None:
            self._decoded = self._x()
        x = self._decoded[index] if self.batched else self._decoded
        with_outputs = "orig_out" in self.outputs or "merged_out" in self.outputs
        return RoundTripInput(self.seeds[index], x, self.features[index], with_outputs)

    def output_elements(self) -> int:
        """Elements each of ``orig_out`` and ``merged_out`` would hold for this call."""
        rows = math.prod(self.row_shape[:-1])
        return sum(rows * features for features in self.features)

    def answer_wire_bytes(self) -> int:
        """An upper bound of the ``ModelInferResponse``'s bytes on the wire: the result rows,
        each output asked for (every request's output bytes), and the tensors' metadata."""
        outputs = sum(1 for name in self.outputs if name != "result")
        output_bytes = sum(size.output_bytes for size in self.sizes)
        metadata = 64 + 11 * (len(self.row_shape) + 1)
        return 256 + 12 * len(self.seeds) + outputs * output_bytes + metadata * len(self.outputs)


def naming_the_request(batched: bool, index: int, error: RequestError) -> RequestError:
    """``error`` for request ``index`` of a call; in a batched call it says which one it was.

    >>> naming_the_request(True, 1, InvalidArgument("features must be >= 1 (got 0)")).message
    'request 1 (row 1 of seed and x): features must be >= 1 (got 0)'
    """
    if not batched:
        return error
    return type(error)(f"request {index} (row {index} of seed and x): {error.message}")


def unpack(request: v2pb.ModelInferRequest, limits: RequestLimits, *, max_items: int) -> Unpacked:
    """Check ``request`` and split it into the worker's requests, weighed against ``limits``.

    Counts, shapes and limits are checked before any tensor's elements are read: a ``seed``
    of sixty million elements is refused on its declared shape. x is read only when
    :meth:`Unpacked.item` first needs it, after admission has reserved its bytes: raw
    contents are read in place; typed contents (``fp32_contents``...) are copied once.
    The model it names is the door's to check (:func:`check_model`), once, before this.
    """
    tensors = _inputs(request)
    seeds = _integers(tensors, "seed", max_items)
    count = len(seeds)
    features = _integers(tensors, "features", count)
    if count == 0:
        raise InvalidArgument("seed has no elements: it needs one per request")
    if len(features) not in (1, count):
        raise InvalidArgument(
            f"features has {len(features)} elements: it needs 1 (shared) or one per seed ({count})"
        )
    x_tensor, x_raw = tensors["x"]
    if x_tensor.datatype not in X_DATATYPES:
        raise InvalidArgument(
            f"x has datatype {x_tensor.datatype!r}: use one of {', '.join(X_DATATYPES)}"
        )
    dtype = NUMPY_OF[x_tensor.datatype]
    shape = _shape(x_tensor)
    batched = count > 1
    if batched and (len(shape) < 2 or shape[0] != count):
        raise InvalidArgument(
            f"x has shape {list(shape)}, but seed holds {count} requests: x needs shape "
            f"[{count}, ..., width] (row i is request i's x)"
        )
    row_shape = shape[1:] if batched else shape
    outputs = _outputs(request)
    with_outputs = "orig_out" in outputs or "merged_out" in outputs
    shared = len(features) == 1
    if with_outputs and batched and len(set(features)) > 1:
        raise InvalidArgument(
            "orig_out and merged_out are one tensor each, so a call of many requests that "
            "asks for them needs one features value for all (give features one element)"
        )
    per_item = list(features) * count if shared else list(features)
    weighed: dict[int, WorkingSet] = {}
    for index, value in enumerate(per_item):
        if value not in weighed:
            try:
                weighed[value] = weigh_shape(
                    row_shape, dtype, value, limits, with_outputs=with_outputs
                )
            except RequestError as error:
                raise (error if shared else naming_the_request(batched, index, error)) from None
    return Unpacked(
        seeds=seeds,
        features=per_item,
        sizes=[weighed[value] for value in per_item],
        outputs=outputs,
        batched=batched,
        row_shape=row_shape,
        _x=functools.partial(_x_elements, x_tensor, x_raw, dtype, shape),
    )


def pack(
    request: v2pb.ModelInferRequest, call: Unpacked, answers: Sequence[RoundTripAnswer]
) -> v2pb.ModelInferResponse:
    """The answers as a ``ModelInferResponse``: the outputs asked for, in that order, raw."""
    response = v2pb.ModelInferResponse(
        model_name=MODEL_NAME, model_version=MODEL_VERSION, id=request.id
    )
    for name in call.outputs:
        if name == "result":  # [B, 3] float32: a few floats, packed without numpy
            datatype, shape = "FP32", (len(answers), 3)
            raw = b"".join(RESULT_ROW.pack(*answer.as_list()) for answer in answers)
        else:
            data = _stacked_output(name, call, answers)
            datatype, shape, raw = DATATYPE_OF[data.dtype.name], data.shape, data.tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


def _stacked_output(
    name: str, call: Unpacked, answers: Sequence[RoundTripAnswer]
) -> npt.NDArray[Any]:
    """``orig_out`` or ``merged_out`` as one little-endian array (a leading axis B when
    batched)."""
    parts = [getattr(answer, name) for answer in answers]
    data = np.stack(parts) if call.batched else parts[0]
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))


def _inputs(
    request: v2pb.ModelInferRequest,
) -> dict[str, tuple[v2pb.ModelInferRequest.InferInputTensor, bytes | None]]:
    """Each input by name with its raw contents (None when typed), every rule of the protocol
    about which inputs and which contents checked."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "it needs one per input, in the order of inputs"
        )
    tensors: dict[str, tuple[v2pb.ModelInferRequest.InferInputTensor, bytes | None]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in INPUTS:
            raise InvalidArgument(
                f"unknown input {tensor.name!r}: this model takes {', '.join(INPUTS)}"
            )
        if tensor.name in tensors:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        if raw and tensor.HasField("contents"):
            raise InvalidArgument(
                f"{tensor.name} has contents, but raw_input_contents is used: use one or the other"
            )
        tensors[tensor.name] = (tensor, raw[index] if raw else None)
    for name in INPUTS:
        if name not in tensors:
            raise InvalidArgument(
                f"input {name!r} is missing: this model takes seed (INT64), "
                "x (FP32, FP64, FP16 or BF16; last axis = input width) and features (INT64)"
            )
    return tensors


def _shape(tensor: v2pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    if len(tensor.shape) > MAX_TENSOR_RANK:
        raise InvalidArgument(
            f"{tensor.name}.shape has {len(tensor.shape)} dimensions, over {MAX_TENSOR_RANK}"
        )
    shape = tuple(tensor.shape)
    if shape and min(shape) < 0:
        axis = next(axis for axis, dim in enumerate(shape) if dim < 0)
        raise InvalidArgument(f"{tensor.name}.shape: dimension {axis} is negative ({shape[axis]})")
    return shape


def _integers(
    tensors: dict[str, tuple[v2pb.ModelInferRequest.InferInputTensor, bytes | None]],
    name: str,
    most: int,
) -> list[int]:
    """An INT64 input's values, its count checked against ``most`` on its declared shape
    (and its contents' length) before any value is read."""
    tensor, raw = tensors[name]
    if tensor.datatype != "INT64":
        raise InvalidArgument(f"{name} has datatype {tensor.datatype!r}: use INT64")
    shape = _shape(tensor)
    if len(shape) > 2:
        raise InvalidArgument(f"{name} has shape {list(shape)}: it needs rank 1 (or [B, 1])")
    count = math.prod(shape)
    if count > most and name == "seed":
        raise LimitExceeded(
            f"a ModelInfer call holds {count} requests (seed's elements), over this worker's "
            f"limit of {most} (max_batch_items, env ROUNDTRIP_MAX_BATCH_ITEMS)"
        )
    if count > most:
        raise InvalidArgument(
            f"{name} has {count} elements: it needs 1 (shared) or one per seed ({most})"
        )
    if raw is not None:
        _check_size(name, len(raw), count, 8, shape, "INT64")
        return list(struct.unpack(f"<{count}q", raw))
    values = tensor.contents.int64_contents
    if len(values) != count:
        raise InvalidArgument(
            f"{name}: {len(values)} int64_contents, but shape {list(shape)} needs {count}"
        )
    return list(values)


def _x_elements(
    tensor: v2pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
) -> npt.NDArray[Any]:
    count = math.prod(shape)
    if raw is not None:
        _check_size("x", len(raw), count, dtype.itemsize, shape, tensor.datatype)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if tensor.datatype == "FP32":
        values: Any = tensor.contents.fp32_contents
    elif tensor.datatype == "FP64":
        values = tensor.contents.fp64_contents
    else:  # the protocol has no typed contents for 16-bit floats
        raise InvalidArgument(
            f"x has datatype {tensor.datatype}: its elements must come in raw_input_contents "
            "(the protocol has no typed contents for 16-bit floats)"
        )
    if len(values) != count:
        field = f"{tensor.datatype.lower()}_contents"
        raise InvalidArgument(f"x: {len(values)} {field}, but shape {list(shape)} needs {count}")
    array = np.asarray(values, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return array


def _check_size(
    name: str, size: int, count: int, itemsize: int, shape: tuple[int, ...], datatype: str
) -> None:
    if size != count * itemsize:
        raise InvalidArgument(
            f"{name}: raw_input_contents holds {size} bytes, but shape {list(shape)} of "
            f"{datatype} needs {count * itemsize}"
        )


def _outputs(request: v2pb.ModelInferRequest) -> tuple[str, ...]:
    names = tuple(output.name for output in request.outputs)
    for name in names:
        if name not in OUTPUTS:
            raise InvalidArgument(f"unknown output {name!r}: this model has {', '.join(OUTPUTS)}")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"an output is asked for twice: {list(names)}")
    return names or DEFAULT_OUTPUTS
