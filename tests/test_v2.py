"""The V2 (Open Inference Protocol) doors into the worker: gRPC ModelInfer on the worker's own
port and REST on ``http_port``. Each answer is bit-identical to the eager reference; errors
carry RoundTrip's codes and messages (REST: their HTTP statuses and V2's ``{"error": ...}``).

tritonclient, the client other teams use, is in tests/test_tritonclient.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
from google.protobuf import json_format
from reference import reference, reference_with_outputs

from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.polling import wait_for
from support.v2_stub import V2Stub
from support.workers import InProcessWorker, Worker, WorkerProcess, serving_worker

DTYPES = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def v2_call(worker: Worker, method: str, request: Any, response_type: Any, **kw: Any) -> Any:
    with worker.channel() as channel:
        answer = getattr(V2Stub(channel), method)(request, timeout=30, **kw)
    assert isinstance(answer, response_type)
    return answer


def infer(worker: Worker, request: v2pb.ModelInferRequest, **kw: Any) -> Any:
    return v2_call(worker, "ModelInfer", request, v2pb.ModelInferResponse, **kw)


def infer_request(
    seeds: list[int],
    x: np.ndarray,
    features: list[int],
    *,
    raw: bool = True,
    outputs: tuple[str, ...] = (),
    datatype: str | None = None,
) -> v2pb.ModelInferRequest:
    """A ModelInferRequest as a V2 client builds it: raw contents, or typed where V2 has them."""
    request = v2pb.ModelInferRequest(model_name="roundtrip", id="call-1")
    datatype = datatype or next(name for name, dtype in DTYPES.items() if dtype == x.dtype)
    tensors = (
        ("seed", "INT64", np.asarray(seeds, "<i8")),
        ("x", datatype, x),
        ("features", "INT64", np.asarray(features, "<i8")),
    )
    for name, kind, data in tensors:
        tensor = request.inputs.add(name=name, datatype=kind, shape=data.shape)
        if raw:
            request.raw_input_contents.append(np.ascontiguousarray(data).tobytes())
        elif kind == "INT64":
            tensor.contents.int64_contents[:] = data.ravel().tolist()
        elif kind == "FP32":
            tensor.contents.fp32_contents[:] = data.ravel().tolist()
        else:
            tensor.contents.fp64_contents[:] = data.ravel().tolist()
    for name in outputs:
        request.outputs.add(name=name)
    return request


def output(response: Any, name: str) -> np.ndarray:
    index = [tensor.name for tensor in response.outputs].index(name)
    tensor = response.outputs[index]
    dtype = {"FP32": "<f4", "FP64": "<f8"}[tensor.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype).reshape(tuple(tensor.shape))


def same_bits(result_row: np.ndarray, expected: np.ndarray) -> bool:
    """A float32 row of the answer against the reference's float64 numbers, bit for bit."""
    return bool(
        np.array_equal(result_row.astype(np.float64).view(np.int64), expected.view(np.int64))
    )


def http(
    worker: Worker,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(
        f"http://127.0.0.1:{worker.http_port}{path}", data=data, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def json_infer(
    seeds: list[int], x: np.ndarray, features: list[int], **extra: Any
) -> dict[str, Any]:
    datatype = next(name for name, dtype in DTYPES.items() if dtype == x.dtype)
    return {
        "inputs": [
            {"name": "seed", "datatype": "INT64", "shape": [len(seeds)], "data": seeds},
            {
                "name": "x",
                "datatype": datatype,
                "shape": list(x.shape),
                "data": x.astype(np.float64).ravel().tolist(),
            },
            {"name": "features", "datatype": "INT64", "shape": [len(features)], "data": features},
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def v2_worker() -> Iterator[InProcessWorker]:
    with serving_worker("--max-batch-items", "16", "--warmup-shapes", "3:4") as process:
        yield process


# -- metadata, health ---------------------------------------------------------------------


def test_grpc_metadata_and_readiness(v2_worker: InProcessWorker) -> None:
    live = v2_call(v2_worker, "ServerLive", v2pb.ServerLiveRequest(), v2pb.ServerLiveResponse)
    ready = v2_call(v2_worker, "ServerReady", v2pb.ServerReadyRequest(), v2pb.ServerReadyResponse)
    model = v2_call(
        v2_worker,
        "ModelReady",
        v2pb.ModelReadyRequest(name="roundtrip", version="1"),
        v2pb.ModelReadyResponse,
    )
    assert (live.live, ready.ready, model.ready) == (True, True, True)
    metadata = v2_call(
        v2_worker,
        "ModelMetadata",
        v2pb.ModelMetadataRequest(name="roundtrip"),
        v2pb.ModelMetadataResponse,
    )
    assert [(t.name, t.datatype) for t in metadata.inputs] == [
        ("seed", "INT64"),
        ("x", "FP32"),
        ("features", "INT64"),
    ]
    assert [t.name for t in metadata.outputs] == ["result", "orig_out", "merged_out"]
    assert list(metadata.versions) == ["1"]
    server = v2_call(
        v2_worker, "ServerMetadata", v2pb.ServerMetadataRequest(), v2pb.ServerMetadataResponse
    )
    assert server.name == "roundtrip"
    assert "binary_tensor_data" in server.extensions


def test_an_unknown_model_or_version_is_not_found(v2_worker: InProcessWorker) -> None:
    for name, version in (("resnet", ""), ("roundtrip", "2")):
        with pytest.raises(grpc.RpcError) as caught:
            v2_call(
                v2_worker,
                "ModelReady",
                v2pb.ModelReadyRequest(name=name, version=version),
                v2pb.ModelReadyResponse,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    status, _, body = http(v2_worker, "/v2/models/resnet")
    assert status == 404
    assert json.loads(body) == {"error": "unknown model 'resnet': this worker serves 'roundtrip'"}


def test_rest_metadata_and_health(v2_worker: InProcessWorker) -> None:
    assert http(v2_worker, "/v2/health/live")[0] == 200
    assert http(v2_worker, "/v2/health/ready")[0] == 200
    assert http(v2_worker, "/v2/models/roundtrip/ready")[0] == 200
    assert http(v2_worker, "/v2/models/roundtrip/versions/1/ready")[0] == 200
    status, _, body = http(v2_worker, "/v2/models/roundtrip")
    metadata = json.loads(body)
    assert status == 200
    assert metadata["name"] == "roundtrip"
    assert metadata["inputs"][1] == {"name": "x", "datatype": "FP32", "shape": [-1, -1]}
    assert json.loads(http(v2_worker, "/v2")[2])["extensions"] == [
        "binary_tensor_data",
        "model_configuration",
        "statistics",
    ]


def test_both_doors_describe_the_model_field_by_field_the_same(
    v2_worker: InProcessWorker,
) -> None:
    """Server and model metadata, Triton's configuration and statistics: what gRPC sends,
    written in V2's REST JSON (int64s as numbers), is exactly what REST sends."""
    x = np.array([[1, 2, 3]], dtype=np.float32)
    infer(v2_worker, infer_request([1], x, [4]))  # statistics not all 0
    pairs = [
        ("/v2", "ServerMetadata", v2pb.ServerMetadataRequest(), v2pb.ServerMetadataResponse),
        (
            "/v2/models/roundtrip",
            "ModelMetadata",
            v2pb.ModelMetadataRequest(name="roundtrip"),
            v2pb.ModelMetadataResponse,
        ),
        (
            "/v2/models/roundtrip/config",
            "ModelConfig",
            v2pb.ModelConfigRequest(name="roundtrip"),
            v2pb.ModelConfigResponse,
        ),
        (
            "/v2/models/roundtrip/stats",
            "ModelStatistics",
            v2pb.ModelStatisticsRequest(name="roundtrip"),
            v2pb.ModelStatisticsResponse,
        ),
    ]
    for path, method, request, response_type in pairs:
        status, _, body = http(v2_worker, path)
        assert status == 200, path
        sent = v2_call(v2_worker, method, request, response_type)
        if method == "ModelConfig":
            sent = sent.config
        written = json.loads(body)
        assert as_grpc_json(sent) == as_grpc_json(json_format.ParseDict(written, type(sent)()))
        assert set(written) <= {field.name for field in sent.DESCRIPTOR.fields}, path


def as_grpc_json(message: Any) -> dict[str, Any]:
    """Every field of ``message``, set or not, as protobuf writes it: two messages equal
    here are equal field by field."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# -- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", list(DTYPES))
@pytest.mark.parametrize("shape", [(3,), (2, 5), (2, 1, 4)])
def test_grpc_answers_are_the_reference_bits(
    v2_worker: InProcessWorker, datatype: str, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(len(shape) * 10 + len(datatype))
    x = rng.normal(size=shape).astype(DTYPES[datatype])
    for raw in (True, False) if datatype in ("FP32", "FP64") else (True,):
        response = infer(v2_worker, infer_request([-7], x, [3], raw=raw))
        assert response.id == "call-1"
        assert (response.model_name, response.model_version) == ("roundtrip", "1")
        result = output(response, "result")
        assert result.shape == (1, 3)
        assert same_bits(result[0], reference(-7, x, 3)), (datatype, shape, raw)


def test_many_requests_in_one_call_each_equal_to_itself_alone(v2_worker: InProcessWorker) -> None:
    rng = np.random.default_rng(3)
    seeds = [0, 1, -1, 2**31, 2**40 + 5, 7, 8, 9]
    features = [1, 2, 3, 4, 5, 6, 7, 8]
    x = rng.normal(size=(8, 2, 6)).astype(np.float32)
    response = infer(v2_worker, infer_request(seeds, x, features))
    result = output(response, "result")
    assert result.shape == (8, 3)
    for i, (seed, width) in enumerate(zip(seeds, features, strict=True)):
        assert same_bits(result[i], reference(seed, x[i], width)), i
    # one shared features value, and outputs stacked on a leading axis
    response = infer(v2_worker, infer_request(seeds, x, [4], outputs=("merged_out", "result")))
    assert [tensor.name for tensor in response.outputs] == ["merged_out", "result"]
    merged = output(response, "merged_out")
    assert merged.shape == (8, 2, 4)
    for i, seed in enumerate(seeds):
        numbers, _, merged_out = reference_with_outputs(seed, x[i], 4)
        assert same_bits(output(response, "result")[i], numbers)
        assert np.array_equal(merged[i].view(np.int32), np.asarray(merged_out).view(np.int32))


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_rest_json_answers_are_the_reference_bits(
    v2_worker: InProcessWorker, datatype: str
) -> None:
    x = np.random.default_rng(5).normal(size=(3, 4)).astype(DTYPES[datatype])
    status, _, body = http(v2_worker, "/v2/models/roundtrip/infer", json_infer([11], x, [2]))
    assert status == 200, body
    document = json.loads(body)
    [result] = document["outputs"]
    assert (result["name"], result["datatype"], result["shape"]) == ("result", "FP32", [1, 3])
    assert same_bits(np.asarray(result["data"], np.float32), reference(11, x, 2))


def test_rest_binary_data_both_ways(v2_worker: InProcessWorker) -> None:
    x = np.random.default_rng(6).normal(size=(4, 3)).astype(ml_dtypes.bfloat16)
    seeds = np.array([5, 6, 7, 8], "<i8")
    header = {
        "inputs": [
            {
                "name": "seed",
                "datatype": "INT64",
                "shape": [4],
                "parameters": {"binary_data_size": 32},
            },
            {
                "name": "x",
                "datatype": "BF16",
                "shape": [4, 3],
                "parameters": {"binary_data_size": 24},
            },
            {"name": "features", "datatype": "INT64", "shape": [1], "data": [2]},
        ],
        "outputs": [{"name": "result", "parameters": {"binary_data": True}}, {"name": "orig_out"}],
    }
    head = json.dumps(header).encode()
    status, headers, body = http(
        v2_worker,
        "/v2/models/roundtrip/versions/1/infer",
        head + seeds.tobytes() + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(head))},
    )
    assert status == 200, body
    split = int(headers["Inference-Header-Content-Length"])
    document = json.loads(body[:split])
    result_meta, orig_meta = document["outputs"]
    assert result_meta["parameters"] == {"binary_data_size": 4 * 3 * 4}
    assert "data" in orig_meta  # not asked for in binary: JSON
    result = np.frombuffer(body[split:], "<f4").reshape(4, 3)
    for i, seed in enumerate(seeds.tolist()):
        assert same_bits(result[i], reference(seed, x[i], 2))


# -- errors -------------------------------------------------------------------------------


def without(request: v2pb.ModelInferRequest, name: str) -> v2pb.ModelInferRequest:
    keep = [i for i, tensor in enumerate(request.inputs) if tensor.name != name]
    trimmed = v2pb.ModelInferRequest(model_name=request.model_name)
    for i in keep:
        trimmed.inputs.append(request.inputs[i])
        trimmed.raw_input_contents.append(request.raw_input_contents[i])
    return trimmed


def bad_requests() -> list[tuple[str, v2pb.ModelInferRequest, grpc.StatusCode, str]]:
    x = np.ones((2, 3), np.float32)
    good = infer_request([1], x, [2])
    short = infer_request([1], x, [2])
    short.raw_input_contents[1] = short.raw_input_contents[1][:-4]
    wrong_type = infer_request([1], x.astype(np.int32), [2], datatype="INT32")
    zero_features = infer_request([1, 2], x, [0])
    many = infer_request(list(range(17)), np.ones((17, 3), np.float32), [2])
    big_features = infer_request([1], x, [10**6])
    mismatched = infer_request([1, 2, 3], x, [2])
    unknown_output = infer_request([1], x, [2], outputs=("logits",))
    ragged_outputs = infer_request([1, 2], x, [2, 3], outputs=("orig_out",))
    return [
        ("missing x", without(good, "x"), grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is missing"),
        (
            "short raw",
            short,
            grpc.StatusCode.INVALID_ARGUMENT,
            "x: raw_input_contents holds 20 bytes",
        ),
        ("int x", wrong_type, grpc.StatusCode.INVALID_ARGUMENT, "x has datatype 'INT32'"),
        ("features 0", zero_features, grpc.StatusCode.INVALID_ARGUMENT, "features must be >= 1"),
        ("17 items", many, grpc.StatusCode.INVALID_ARGUMENT, "max_batch_items"),
        ("features 1e6", big_features, grpc.StatusCode.INVALID_ARGUMENT, "max_features"),
        ("3 seeds, 2 rows", mismatched, grpc.StatusCode.INVALID_ARGUMENT, "x needs shape [3,"),
        ("unknown output", unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
        ("ragged outputs", ragged_outputs, grpc.StatusCode.INVALID_ARGUMENT, "one features value"),
    ]


@pytest.mark.parametrize(
    ("case", "request_", "code", "message"), bad_requests(), ids=[c[0] for c in bad_requests()]
)
def test_bad_calls_get_roundtrips_codes_and_name_the_tensor(
    v2_worker: InProcessWorker,
    case: str,
    request_: v2pb.ModelInferRequest,
    code: grpc.StatusCode,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        infer(v2_worker, request_)
    assert caught.value.code() == code, caught.value.details()
    assert message in (caught.value.details() or "")


def test_a_failing_request_of_a_batch_is_named(v2_worker: InProcessWorker) -> None:
    x = np.ones((3, 4), np.float32)
    with pytest.raises(grpc.RpcError) as caught:
        infer(v2_worker, infer_request([1, 2, 3], x, [2, 0, 2]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "request 1 (row 1 of seed and x): features must be >= 1 (got 0)"
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (
            {"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}]},
            400,
            "input 'x' is missing",
        ),
        (json_infer([1], np.ones(3, np.float32), [0]), 400, "features must be >= 1 (got 0)"),
        (json_infer([1], np.ones(3, np.float32), [70000]), 400, "max_features"),
        (json_infer(list(range(17)), np.ones((17, 2), np.float32), [1]), 400, "max_batch_items"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]},
            400,
            "x: 'data' holds 'a', which is not a FP32 value",
        ),
    ],
    ids=["json", "missing", "features-0", "max-features", "max-items", "strings"],
)
def test_rest_errors_get_their_http_status_and_v2_body(
    v2_worker: InProcessWorker, body: Any, status: int, message: str
) -> None:
    got, _, answer = http(v2_worker, "/v2/models/roundtrip/infer", body)
    assert got == status, answer
    error = json.loads(answer)
    assert list(error) == ["error"]
    assert message in error["error"]


def with_input(name: str, **changes: Any) -> dict[str, Any]:
    """A good JSON infer body with one input's fields changed."""
    body = json_infer([1], np.arange(1, 4, dtype=np.float32), [4])
    [tensor] = [t for t in body["inputs"] if t["name"] == name]
    tensor.update(changes)
    return body


MALFORMED_JSON: dict[str, tuple[bytes | dict[str, Any], str]] = {
    "features 4.9": (with_input("features", data=[4.9]), "features"),
    "seed 0.5": (with_input("seed", data=[0.5]), "seed"),
    "seed true": (with_input("seed", data=[True]), "seed"),
    "seed string": (with_input("seed", data=["1"]), "seed"),
    "x null": (with_input("x", data=[1.0, None, 3.0]), "x"),
    "x true": (with_input("x", data=[1.0, True, 3.0]), "x"),
    "x string": (with_input("x", data=["1", 2.0, 3.0]), "x"),
    "binary_data_output string": (
        {**with_input("x"), "parameters": {"binary_data_output": "false"}},
        "binary_data_output",
    ),
    "nested 2000 deep": (b'{"inputs": ' + b"[" * 2000 + b"]" * 2000 + b"}", "JSON"),
    "x NaN": (with_input("x", data=[1.0, float("nan"), 3.0]), "NaN is not a JSON number"),
    "x -Infinity": (with_input("x", data=[-math.inf, 2.0, 3.0]), "Infinity is not a JSON"),
    "x 1e400": (
        json.dumps(with_input("x", data=[1.0, 2.5, 3.0])).replace("2.5", "1e400").encode(),
        "x: 'data' holds inf",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_JSON))
def test_rest_json_is_validated_never_coerced(v2_worker: InProcessWorker, case: str) -> None:
    """A malformed request gets 400 naming what is wrong, never an answer to another
    question (4.9 features answered as 4, null as NaN...)."""
    body, named = MALFORMED_JSON[case]
    status, _, answer = http(v2_worker, "/v2/models/roundtrip/infer", body)
    assert status == 400, answer
    assert named in json.loads(answer)["error"]


def test_rest_binary_header_length_takes_digits_only(v2_worker: InProcessWorker) -> None:
    body = json.dumps(json_infer([1], np.arange(1, 4, dtype=np.float32), [4])).encode()
    headers = {"Inference-Header-Content-Length": f" +{len(body) // 10}_{len(body) % 10} "}
    status, _, answer = http(v2_worker, "/v2/models/roundtrip/infer", body, headers)
    assert status == 400, answer
    assert "Inference-Header-Content-Length" in json.loads(answer)["error"]


def test_a_corrupt_gzip_body_is_400(v2_worker: InProcessWorker) -> None:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    status, _, answer = http(
        v2_worker, "/v2/models/roundtrip/infer", b"\x1f\x8b" + b"\0" * 64, headers
    )
    assert status == 400, answer
    assert "gzip" in json.loads(answer)["error"]


def test_x_of_rank_65_is_invalid_argument_on_every_door(v2_worker: InProcessWorker) -> None:
    """numpy's limit is 64 dimensions; past the worker's max_x_rank no door reaches it."""
    shape = [1] * 64 + [3]
    x = pb.Array(dtype=pb.DTYPE_FLOAT32, shape=shape, raw=np.ones(3, np.float32).tobytes())
    request = pb.RoundTripRequest(seed=0, x=x, features=4)
    v2_request = infer_request([0], np.ones((1, 3), np.float32), [4])
    v2_request.inputs[1].shape[:] = [1, *shape]
    body = json_infer([0], np.ones((1, 3), np.float32), [4])
    body["inputs"][1]["shape"] = [1, *shape]
    outcomes: dict[str, tuple[int, str]] = {}
    with v2_worker.channel() as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)
        calls: dict[str, Callable[[], object]] = {
            "RoundTrip": lambda: stub.RoundTrip(request, timeout=30),
            "ModelInfer": lambda: infer(v2_worker, v2_request),
        }
        for door, call in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            outcomes[door] = (refused.value.code().value[0], refused.value.details() or "")
        [streamed] = stub.RoundTripStream(
            iter([pb.RoundTripStreamRequest(id=1, request=request)]), timeout=30
        )
        outcomes["RoundTripStream"] = (streamed.error.code, streamed.error.message)
        batch = pb.RoundTripBatchRequest(requests=[request])
        [batched] = stub.RoundTripBatch(batch, timeout=30).outcomes
        outcomes["RoundTripBatch"] = (batched.error.code, batched.error.message)
    status, _, answer = http(v2_worker, "/v2/models/roundtrip/infer", body)
    outcomes["ModelInferHTTP"] = (3 if status == 400 else status, json.loads(answer)["error"])
    for door, (code, message) in outcomes.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (door, message)
        assert "rank" in message or "dimensions" in message, (door, message)


def test_bad_calls_never_hurt_the_worker(v2_worker: InProcessWorker) -> None:
    for _, request_, _, _ in bad_requests():
        with pytest.raises(grpc.RpcError):
            infer(v2_worker, request_)
    http(v2_worker, "/v2/models/roundtrip/infer", b"\xff" * 100)
    x = np.arange(3, dtype=np.float32)
    assert same_bits(
        output(infer(v2_worker, infer_request([0], x, [4])), "result")[0], reference(0, x, 4)
    )
    assert (
        v2_worker.metric('roundtrip_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}')
        >= 6
    )


# -- readiness, drain, token --------------------------------------------------------------


@pytest.mark.slow
def test_v2_ready_follows_health_through_warm_up_and_drain() -> None:
    process = WorkerProcess("--warmup-shapes", "3:4,64:64,128:128", "--drain-announce-s", "3")
    try:
        assert http(process, "/v2/health/ready")[0] == 503  # still compiling
        assert http(process, "/v2/health/live")[0] == 200
        process.wait_serving()
        assert http(process, "/v2/health/ready")[0] == 200
        os.killpg(process.process.pid, signal.SIGTERM)
        # inside the announce window: not ready, but calls are answered
        wait_for(lambda: http(process, "/v2/health/ready")[0] == 503, "not ready", timeout=2)
        assert http(process, "/v2/models/roundtrip/ready")[0] == 503
        ready = v2_call(process, "ServerReady", v2pb.ServerReadyRequest(), v2pb.ServerReadyResponse)
        assert ready.ready is False
        x = np.ones(3, np.float32)
        status, _, body = http(process, "/v2/models/roundtrip/infer", json_infer([1], x, [4]))
        assert status == 200, body
        assert process.process.wait(60) == 0
    finally:
        process.kill()


def test_rest_needs_the_token_but_its_health_routes_do_not(tmp_path: Any) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with serving_worker("--auth-token-file", str(token), "--warmup-shapes", "3:4") as process:
        body = json_infer([1], np.ones(3, np.float32), [4])
        status, _, answer = http(process, "/v2/models/roundtrip/infer", body)
        assert status == 401
        assert "bearer token" in json.loads(answer)["error"]
        wrong = {"Authorization": "Bearer nope"}
        assert http(process, "/v2/models/roundtrip/infer", body, wrong)[0] == 401
        right = {"Authorization": "Bearer s3cret"}
        assert http(process, "/v2/models/roundtrip/infer", body, right)[0] == 200
        assert http(process, "/v2/health/ready")[0] == 200
        with pytest.raises(grpc.RpcError) as caught:
            infer(process, infer_request([1], np.ones(3, np.float32), [4]))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_http_port_minus_one_turns_rest_off() -> None:
    with serving_worker("--http-port", "-1", "--warmup-shapes", "3:4") as process:
        assert process.http_port == 0
        x = np.ones(3, np.float32)
        assert same_bits(
            output(infer(process, infer_request([2], x, [4])), "result")[0], reference(2, x, 4)
        )


def test_a_body_over_max_message_bytes_is_413_and_counted() -> None:
    with serving_worker("--max-message-bytes", "4096", "--warmup-shapes", "3:4") as process:
        body = json_infer([1], np.ones(2000, np.float32), [4])
        status, _, answer = http(process, "/v2/models/roundtrip/infer", body)
        assert status == 413
        assert "max_message_bytes" in json.loads(answer)["error"]
        sample = 'roundtrip_requests_total{code="INVALID_ARGUMENT",method="ModelInferHTTP"}'
        assert process.metric(sample) == 1
        small = json_infer([0], np.arange(1, 4, dtype=np.float32), [4])
        assert http(process, "/v2/models/roundtrip/infer", small)[0] == 200


def test_json_decoding_is_held_against_the_byte_budget() -> None:
    """A JSON body is kept small (``max_json_bytes``, 413 beyond, naming the binary
    extension) and reserves JSON_EXPANSION x its size before it is decoded; the same tensor
    as binary data needs no such reservation."""
    budget = 2 * 1024 * 1024
    with serving_worker("--max-inflight-bytes", str(budget), "--warmup-shapes", "3:4") as process:
        x = np.random.default_rng(8).normal(size=(2000, 25)).astype(np.float32)
        body = json.dumps(json_infer([3], x, [1])).encode()
        assert len(body) > 128 * 1024
        with socket.create_connection(("127.0.0.1", process.http_port), timeout=10) as sent:
            sent.sendall(  # the headers alone: the refusal comes before the body is read
                b"POST /v2/models/roundtrip/infer HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            answer = sent.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer
        message = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert "max_json_bytes" in message
        assert "binary" in message
        small = json.dumps(json_infer([3], x[:1000, :4], [1])).encode()
        assert 32 * len(small) > budget > len(small)
        status, _, answer = http(process, "/v2/models/roundtrip/infer", small)
        assert status == 400
        message = json.loads(answer)["error"]
        assert "bytes of JSON" in message
        assert "binary" in message
        head = json.dumps(
            {
                "inputs": [
                    {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]},
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [2000, 25],
                        "parameters": {"binary_data_size": x.nbytes},
                    },
                    {"name": "features", "datatype": "INT64", "shape": [1], "data": [1]},
                ]
            }
        ).encode()
        status, _, answer = http(
            process,
            "/v2/models/roundtrip/infer",
            head + x.tobytes(),
            {"Inference-Header-Content-Length": str(len(head))},
        )
        assert status == 200, answer
        [result] = json.loads(answer)["outputs"]
        assert same_bits(np.asarray(result["data"], np.float32), reference(3, x, 1))
