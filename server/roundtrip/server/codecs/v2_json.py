"""V2's REST body as JSON (and the binary tensor data extension), to and from the
``ModelInferRequest`` / ``ModelInferResponse`` the V2 mapping (:mod:`~roundtrip.server.codecs.v2`)
reads and writes: the REST door's codec, beside V2's protobuf one.

JSON ``data`` (flat or nested, row-major) becomes a tensor's raw little-endian bytes, as a
gRPC caller would send them; an input with parameter ``binary_data_size`` takes its bytes
from after the JSON, whose length the ``Inference-Header-Content-Length`` header gives. An
output asked for with ``binary_data: true`` (or every output, with the request's
``binary_data_output``) goes back the same way.

The JSON is read strictly, never coerced: integer tensors take integers (an integral
number such as ``4.0`` is that integer, as SPEC.md says; ``4.9``, ``true``, ``"4"`` and
``null`` are refused), floating tensors take numbers, booleans take booleans, and every
refusal names the input. JSON is decoded on the worker's event loop, so the REST door keeps
it small (``max_json_bytes``); an answer's JSON is encoded in pieces
(:func:`answer_pieces`) so that no piece holds the loop for long.

>>> body = b'{"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [7]}]}'
>>> request, binary = infer_request(memoryview(body), memoryview(b""), "roundtrip", "")
>>> request.inputs[0].name, np.frombuffer(request.raw_input_contents[0], "<i8").tolist()
('seed', [7])
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from roundtrip.server.codecs import v2
from roundtrip.server.errors import InvalidArgument
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb

HEADER_LENGTH = "Inference-Header-Content-Length"
#: Bytes a JSON body may take while decoded, per byte of JSON: Python's numbers and lists
#: (``[[0],[0],...]`` measured 24x; flat floats 1.6x). Reserved from max_inflight_bytes
#: before decoding, so JSON cannot hold more memory than the budget allows (docs/adr/0005).
JSON_EXPANSION = 32
#: Elements of an output encoded as JSON per piece of :func:`answer_pieces` (a few ms).
PIECE_ELEMENTS = 4096
_DIGITS = re.compile(r"[0-9]+")
_INTEGER_KINDS = "iu"
_SEPARATORS = (",", ":")


def header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header's value: digits only, no sign, space
    or underscore (Python's ``int()`` would take ``" +20_6 "``).

    >>> header_length("14"), header_length(None)
    (14, None)
    >>> header_length(" +20_6 ")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    roundtrip.server.errors.InvalidArgument: Inference-Header-Content-Length is not a ...
    """
    if value is None:
        return None
    if not _DIGITS.fullmatch(value):
        raise InvalidArgument(f"{HEADER_LENGTH} is not a length: {value!r}")
    return int(value)


def infer_request(
    text: memoryview, binary: memoryview, model: str, version: str
) -> tuple[v2pb.ModelInferRequest, set[str]]:
    """A REST infer body (its JSON ``text``, the ``binary`` data after it) as the
    ``ModelInferRequest`` it means, and the names of the outputs wanted in binary."""
    try:
        document = json.loads(bytes(text), parse_constant=_not_json)
    except RecursionError:
        raise InvalidArgument("the request body is JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"the request body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request body must be a JSON object with 'inputs'")
    call_id = document.get("id", "")
    if not isinstance(call_id, str):
        raise InvalidArgument("'id' must be a string")
    request = v2pb.ModelInferRequest(model_name=model, model_version=version, id=call_id)
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("'inputs' must be a list of tensors")
    offset = 0
    for tensor in inputs:
        name, datatype, shape, parameters = _tensor_header(tensor)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        size = parameters.get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"{name}: binary_data_size {size!r} does not fit the {len(binary)} bytes "
                    f"of binary data after the JSON (offset {offset})"
                )
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        else:
            request.raw_input_contents.append(_json_elements(tensor, name, datatype, shape))
    if offset != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    wanted_binary = _flag(_parameters(document, "request"), "binary_data_output", False)
    binary_outputs = set()
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidArgument("each of 'outputs' needs a 'name'")
        request.outputs.add(name=output["name"])
        if _flag(_parameters(output, output["name"]), "binary_data", wanted_binary):
            binary_outputs.add(output["name"])
    if wanted_binary and not outputs:
        binary_outputs.update(v2.DEFAULT_OUTPUTS)
    return request, binary_outputs


def _not_json(constant: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity``: Python's json reads them, JSON has none."""
    raise ValueError(f"{constant} is not a JSON number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameter {name!r} must be true or false (got {value!r})")
    return value


def _parameters(document: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{what}: 'parameters' must be an object")
    return parameters


def _tensor_header(tensor: Any) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(tensor, dict):
        raise InvalidArgument("each of 'inputs' must be an object")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str):
        raise InvalidArgument("each of 'inputs' needs a 'name'")
    if datatype not in v2.NUMPY_OF:
        raise InvalidArgument(
            f"{name}: datatype {datatype!r} is not one this worker reads ({', '.join(v2.NUMPY_OF)})"
        )
    if not isinstance(shape, list) or not all(_is_int(dim) and dim >= 0 for dim in shape):
        raise InvalidArgument(f"{name}: 'shape' must be a list of integers >= 0")
    if len(shape) > v2.MAX_TENSOR_RANK:
        raise InvalidArgument(
            f"{name}: 'shape' has {len(shape)} dimensions, over {v2.MAX_TENSOR_RANK}"
        )
    return name, datatype, shape, _parameters(tensor, name)


def _json_elements(tensor: dict[str, Any], name: str, datatype: str, shape: list[int]) -> bytes:
    """A tensor's JSON ``data`` (flat or nested, row-major) as little-endian bytes, every
    element of the JSON type its datatype takes, as many as its shape holds."""
    if "data" not in tensor:
        raise InvalidArgument(f"{name}: give 'data' or parameters.binary_data_size")
    dtype = v2.NUMPY_OF[datatype]
    leaves = _leaves(tensor["data"], name, datatype, dtype)
    if len(leaves) != math.prod(shape):
        raise InvalidArgument(
            f"{name}: 'data' has {len(leaves)} elements, but shape {shape} needs {math.prod(shape)}"
        )
    try:
        with np.errstate(over="raise", invalid="raise"):
            return np.asarray(leaves, dtype=dtype).tobytes()
    except (ValueError, TypeError, OverflowError, FloatingPointError) as error:
        raise InvalidArgument(f"{name}: 'data' does not fit {datatype}: {error}") from None


def _leaves(data: Any, name: str, datatype: str, dtype: np.dtype[Any]) -> list[Any]:
    """The elements of ``data`` in row-major order, without recursion (any nesting depth),
    each checked against the JSON type ``datatype`` takes."""
    kind = dtype.kind
    leaves: list[Any] = []
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            leaves.append(_element(value, name, datatype, kind))
        else:
            stack.pop()
    return leaves


def _element(value: Any, name: str, datatype: str, kind: str) -> Any:
    if kind == "b":
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool) or value is None or isinstance(value, str | dict):
        pass
    elif kind in _INTEGER_KINDS:
        if _is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise InvalidArgument(
        f"{name}: 'data' holds {value!r}, which is not a {datatype} value (a finite number)"
    )


def answer_pieces(response: v2pb.ModelInferResponse, binary_outputs: set[str]) -> Iterator[str]:
    """The JSON of a REST answer, in pieces: the outputs' ``data`` arrays split every
    :data:`PIECE_ELEMENTS` elements, so a caller can yield to the event loop between them.
    Joined, the pieces are ``json.dumps`` of the whole document (compact separators).

    >>> response = v2pb.ModelInferResponse(model_name="roundtrip", model_version="1")
    >>> _ = response.outputs.add(name="result", datatype="FP32", shape=[1, 3])
    >>> response.raw_output_contents.append(np.float32([1, 2, 0]).tobytes())
    >>> "".join(answer_pieces(response, set()))
    '{"model_name":"roundtrip","model_version":"1","outputs":[{"name":"result","datatype":"FP32","shape":[1,3],"data":[1.0,2.0,0.0]}]}'
    """
    head = {"model_name": response.model_name, "model_version": response.model_version}
    yield json.dumps(head, separators=_SEPARATORS)[:-1] + ',"outputs":['
    for index, (tensor, raw) in enumerate(
        zip(response.outputs, response.raw_output_contents, strict=True)
    ):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        comma = "," if index else ""
        if tensor.name in binary_outputs:
            entry["parameters"] = {"binary_data_size": len(raw)}
            yield comma + json.dumps(entry, separators=_SEPARATORS)
            continue
        values = np.frombuffer(raw, dtype=v2.NUMPY_OF[tensor.datatype]).tolist()
        yield comma + json.dumps(entry, separators=_SEPARATORS)[:-1] + ',"data":['
        for start in range(0, len(values), PIECE_ELEMENTS):
            piece = json.dumps(values[start : start + PIECE_ELEMENTS], separators=_SEPARATORS)
            yield ("," if start else "") + piece[1:-1]
        yield "]}"
    yield "]" + (',"id":' + json.dumps(response.id) if response.id else "") + "}"


def binary_tail(response: v2pb.ModelInferResponse, binary_outputs: set[str]) -> list[bytes]:
    """The binary outputs' bytes, in order, sent after the JSON."""
    return [
        raw
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        if tensor.name in binary_outputs
    ]
