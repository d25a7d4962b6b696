"""V2's REST body as JSON (and the binary tensor data extension), to and from the
``ModelInferRequest`` / ``ModelInferResponse`` the V2 mapping (:mod:`~roundtrip.server.v2`)
reads and writes: the REST door's codec, beside V2's protobuf one.

JSON ``data`` (flat or nested, row-major) becomes a tensor's raw little-endian bytes, as a
gRPC caller would send them; an input with parameter ``binary_data_size`` takes its bytes
from after the JSON, whose length the ``Inference-Header-Content-Length`` header gives. An
output asked for with ``binary_data: true`` (or every output, with the request's
``binary_data_output``) goes back the same way.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from roundtrip.server import v2
from roundtrip.server.errors import InvalidArgument
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb

HEADER_LENGTH = "Inference-Header-Content-Length"


#: Bytes a JSON body may take while decoded, per byte of JSON: Python's numbers and lists
#: (``[[0],[0],...]`` measured 24x; flat floats 1.6x). Reserved from max_inflight_bytes
#: before decoding, so JSON cannot hold more memory than the budget allows.
JSON_EXPANSION = 32


def json_length(body: bytes, header_length: str | None) -> int:
    """How many leading bytes of ``body`` are JSON: all of them, or what the binary data
    extension's ``Inference-Header-Content-Length`` says.

    >>> json_length(b'{"inputs": []}abcd', "14")
    14
    """
    if header_length is None:
        return len(body)
    try:
        split = int(header_length)
    except ValueError:
        raise InvalidArgument(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
    if not 0 <= split <= len(body):
        raise InvalidArgument(f"{HEADER_LENGTH} is {split}, but the body has {len(body)} bytes")
    return split


def infer_request(body: bytes, split: int, model: str, version: str) -> Any:
    """A REST infer body (JSON in its first ``split`` bytes, binary data after them) as the
    ``ModelInferRequest`` it means, plus the names of the outputs wanted in binary.

    >>> body = b'{"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [7]}]}'
    >>> request, binary = infer_request(body, len(body), "roundtrip", "")
    >>> request.inputs[0].name, np.frombuffer(request.raw_input_contents[0], "<i8").tolist()
    ('seed', [7])
    """
    try:
        document = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"the request body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request body must be a JSON object with 'inputs'")
    binary = memoryview(body)[split:]
    request = v2pb.ModelInferRequest(
        model_name=model, model_version=version, id=str(document.get("id", ""))
    )
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("'inputs' must be a list of tensors")
    offset = 0
    for tensor in inputs:
        name, datatype, shape, parameters = _tensor_header(tensor, "inputs")
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"{name}: binary_data_size {size!r} does not fit the {len(binary)} bytes "
                    f"of binary data after the JSON (offset {offset})"
                )
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        else:
            request.raw_input_contents.append(_json_elements(tensor, name, datatype))
    if offset != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    wanted_binary = bool(_parameters(document, "request").get("binary_data_output", False))
    binary_outputs = set()
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidArgument("each of 'outputs' needs a 'name'")
        request.outputs.add(name=output["name"])
        if _parameters(output, output["name"]).get("binary_data", wanted_binary):
            binary_outputs.add(output["name"])
    if wanted_binary and not outputs:
        binary_outputs.update(v2.DEFAULT_OUTPUTS)
    return request, binary_outputs


def _parameters(document: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{what}: 'parameters' must be an object")
    return parameters


def _tensor_header(tensor: Any, where: str) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(tensor, dict):
        raise InvalidArgument(f"each of '{where}' must be an object")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str):
        raise InvalidArgument(f"each of '{where}' needs a 'name'")
    if datatype not in v2.NUMPY_OF:
        raise InvalidArgument(
            f"{name}: datatype {datatype!r} is not one this worker reads ({', '.join(v2.NUMPY_OF)})"
        )
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) for dim in shape
    ):
        raise InvalidArgument(f"{name}: 'shape' must be a list of integers")
    return name, datatype, shape, _parameters(tensor, name)


def _json_elements(tensor: dict[str, Any], name: str, datatype: str) -> bytes:
    """A tensor's JSON ``data`` (flat or nested, row-major) as little-endian bytes."""
    if "data" not in tensor:
        raise InvalidArgument(f"{name}: give 'data' or parameters.binary_data_size")
    try:
        with np.errstate(over="raise", invalid="raise"):
            return np.asarray(tensor["data"], dtype=v2.NUMPY_OF[datatype]).tobytes()
    except (ValueError, TypeError, OverflowError, FloatingPointError) as error:
        raise InvalidArgument(f"{name}: 'data' is not {datatype} numbers: {error}") from None


def infer_body(
    response: v2pb.ModelInferResponse, binary_outputs: set[str]
) -> tuple[bytes, int | None]:
    """The REST body of ``response``: its JSON, then the binary outputs' bytes; and the JSON's
    length when any output is binary (the ``Inference-Header-Content-Length``)."""
    outputs = []
    tail = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.name in binary_outputs:
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, dtype=v2.NUMPY_OF[tensor.datatype]).tolist()
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not tail:
        return header, None
    return header + b"".join(tail), len(header)
