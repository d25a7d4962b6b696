"""Calls a worker through the real tritonclient, as another team would; run in its own
environment (``.tools/tritonclient``, from requirements.txt), never in the worker's.

    python calls.py GRPC_TARGET HTTP_TARGET < cases.json > answers.json

Each case names its way in:

* ``grpc``: ``tritonclient.grpc`` (raw_input_contents);
* ``grpc-typed``: tritonclient's own generated V2 stub with typed contents (fp32_contents...),
  which its high-level client never sends;
* ``http``: ``tritonclient.http`` with the binary tensor data extension (its default);
* ``http-json``: ``tritonclient.http`` with JSON data (``binary_data=False``) both ways.

A case's ``seed`` and ``features`` are lists (B requests when B > 1) and ``x`` is its flat
float64 values; the answer is each call's ``result`` as float64 lists (float32 -> float64 is
exact), plus what the client's readiness and metadata calls said.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import ml_dtypes
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}


def inputs(module: Any, case: dict[str, Any], binary: bool | None) -> list[Any]:
    seeds = np.asarray(case["seed"], dtype=np.int64)
    features = np.asarray(case["features"], dtype=np.int64)
    x = np.asarray(case["x"], dtype=NUMPY[case["datatype"]]).reshape(case["shape"])
    tensors = []
    for name, data, datatype in (
        ("seed", seeds, "INT64"),
        ("x", x, case["datatype"]),
        ("features", features, "INT64"),
    ):
        tensor = module.InferInput(name, list(data.shape), datatype)
        if binary is None:
            tensor.set_data_from_numpy(data)
        else:
            tensor.set_data_from_numpy(data, binary_data=binary)
        tensors.append(tensor)
    return tensors


def typed_call(stub: Any, case: dict[str, Any]) -> list[list[float]]:
    request = service_pb2.ModelInferRequest(model_name="roundtrip")
    for name, datatype, shape, field, values in (
        ("seed", "INT64", [len(case["seed"])], "int64_contents", case["seed"]),
        ("x", case["datatype"], case["shape"], case["datatype"].lower() + "_contents", case["x"]),
        ("features", "INT64", [len(case["features"])], "int64_contents", case["features"]),
    ):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
    response = stub.ModelInfer(request, timeout=60)
    [tensor] = response.outputs
    result = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(tensor.shape))
    rows: list[list[float]] = result.astype(np.float64).tolist()
    return rows


def main() -> None:
    grpc_target, http_target = sys.argv[1], sys.argv[2]
    cases = json.load(sys.stdin)
    grpc_client = grpcclient.InferenceServerClient(grpc_target)
    http_client = httpclient.InferenceServerClient(http_target, network_timeout=60)
    import grpc  # tritonclient's own dependency

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(grpc_target))
    answers: dict[str, Any] = {}
    for case in cases:
        way = case["way"]
        if way == "grpc":
            response = grpc_client.infer("roundtrip", inputs(grpcclient, case, None))
            result = response.as_numpy("result")
        elif way == "grpc-typed":
            answers[case["id"]] = typed_call(stub, case)
            continue
        else:
            binary = way == "http"
            response = http_client.infer(
                "roundtrip",
                inputs(httpclient, case, binary),
                outputs=[httpclient.InferRequestedOutput("result", binary_data=binary)],
            )
            result = response.as_numpy("result")
        answers[case["id"]] = result.astype(np.float64).tolist()
    grpc_metadata = grpc_client.get_model_metadata("roundtrip", as_json=True)
    http_metadata = http_client.get_model_metadata("roundtrip")
    json.dump(
        {
            "answers": answers,
            "grpc": {
                "server_live": grpc_client.is_server_live(),
                "server_ready": grpc_client.is_server_ready(),
                "model_ready": grpc_client.is_model_ready("roundtrip"),
                "inputs": [t["name"] for t in grpc_metadata["inputs"]],
            },
            "http": {
                "server_live": http_client.is_server_live(),
                "server_ready": http_client.is_server_ready(),
                "model_ready": http_client.is_model_ready("roundtrip"),
                "inputs": [t["name"] for t in http_metadata["inputs"]],
            },
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
