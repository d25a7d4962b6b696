"""Triton's own tools pointed at the worker: the model configuration and statistics
extensions (gRPC and REST) against the worker's real limits and counters, and
perf_analyzer, the standard load generator for V2 servers, over gRPC and HTTP."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

from roundtrip.client import InvalidArgumentError, RoundTripClient
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb
from support.v2_stub import V2Stub
from support.workers import ROOT, InProcessWorker, serving_worker

M = TypeVar("M")

WORKED = [-4.221933364868164, -4.221933364868164, 0.0]


@pytest.fixture(scope="module")
def audited_worker() -> Iterator[InProcessWorker]:
    flags: tuple[str, ...] = ("--max-batch-items", "24", "--max-queue-delay-us", "249")
    flags += ("--warmup-shapes", "3:4,64:64")  # the shapes of bench/perf's requests
    flags += ("--audit-fraction", "1.0")  # every answer checked against the eager reference
    with serving_worker(*flags) as process:
        yield process


def v2_call(worker: InProcessWorker, method: str, request: Any, response: type[M]) -> M:
    with worker.channel() as channel:
        answer = getattr(V2Stub(channel), method)(request, timeout=30)
    assert isinstance(answer, response)
    return answer


def rest(worker: InProcessWorker, path: str, body: Any = None) -> tuple[int, Any]:
    """The status and the JSON document, parsed (JSON has no static type); ``body``: POSTed
    as JSON."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{worker.http_port}{path}"
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers)) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_model_configuration_states_the_workers_real_limits(
    audited_worker: InProcessWorker,
) -> None:
    status, config = rest(audited_worker, "/v2/models/roundtrip/config")
    assert status == 200
    assert config["max_batch_size"] == 24  # max_batch_items: B per call
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 249}
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("seed", "TYPE_INT64", [1]),
        ("x", "TYPE_FP32", [-1]),
        ("features", "TYPE_INT64", [1]),
    ]
    answer = v2_call(
        audited_worker,
        "ModelConfig",
        v2pb.ModelConfigRequest(name="roundtrip"),
        v2pb.ModelConfigResponse,
    )
    assert answer.config.max_batch_size == 24
    assert [i.name for i in answer.config.input] == ["seed", "x", "features"]
    assert rest(audited_worker, "/v2/models/other/config")[0] == 404
    # the metadata agrees: the same tensors with the batch axis
    metadata = rest(audited_worker, "/v2/models/roundtrip")[1]
    assert [t["shape"] for t in metadata["inputs"]] == [[-1, 1], [-1, -1], [-1, 1]]


def test_statistics_are_the_workers_own_counters(audited_worker: InProcessWorker) -> None:
    def stats() -> Any:
        [model] = rest(audited_worker, "/v2/models/roundtrip/stats")[1]["model_stats"]
        return model

    before = stats()
    with RoundTripClient(audited_worker.target) as client:
        for seed in range(5):
            assert client.round_trip(seed, [1.0, 2.0, 3.0], 4).max_abs_diff == 0.0
        with pytest.raises(InvalidArgumentError):
            client.round_trip(0, [1.0, 2.0, 3.0], 0)
    after = stats()
    done = (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    )
    failed = after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"]
    assert (done, failed) == (5, 1)
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["last_inference"] > 0
    grpc_stats = v2_call(
        audited_worker,
        "ModelStatistics",
        v2pb.ModelStatisticsRequest(),
        v2pb.ModelStatisticsResponse,
    )
    [model] = grpc_stats.model_stats
    assert model.inference_count == after["inference_count"]
    assert model.execution_count == after["execution_count"]


@pytest.mark.external
@pytest.mark.parametrize(
    ("protocol", "data"), [("grpc", "worked_example.json"), ("http", "w2.json")]
)
def test_make_perf_drives_the_worker_and_every_answer_is_the_reference(
    audited_worker: InProcessWorker, protocol: str, data: str
) -> None:
    """``make perf`` as the docs show it, with each data file shipped in ``bench/perf``."""
    # perf_analyzer's own validation wants fixed shapes for every output; the worker's audit
    # (every answer, here) checks each one against the eager reference instead. Whether three
    # windows agree within 25% is a fact about the machine, and the gate's other tests share
    # its cores: ``-s 1000`` (given last, so it wins) takes any three windows as stable.
    port = audited_worker.port if protocol == "grpc" else audited_worker.http_port
    method = "ModelInfer" if protocol == "grpc" else "ModelInferHTTP"
    ok = f'roundtrip_requests_total{{code="OK",method="{method}"}}'
    before = audited_worker.metric(ok)
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "perf",
            f"PERF_TARGET=127.0.0.1:{port}",
            f"PERF_DATA=bench/perf/{data}",
            f"PERF_ARGS=-i {protocol} --concurrency-range 4 -s 1000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", done.stdout)
    assert throughput is not None
    assert float(throughput[1]) > 0
    assert audited_worker.metric(ok) > before
    assert audited_worker.metric("roundtrip_audit_checks_total") > 0
    assert audited_worker.metric("roundtrip_audit_mismatches_total") == 0
    refused = f'roundtrip_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}'
    assert audited_worker.metric(refused) == 0
    print(f"make perf over {protocol}: {throughput[1]} infer/sec")


@pytest.mark.external
def test_a_flag_in_perf_args_wins_over_the_default_settings(
    audited_worker: InProcessWorker,
) -> None:
    """docs/benchmarks.md's advice for a busy machine works: ``PERF_ARGS`` comes last."""
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "perf",
            f"PERF_TARGET=127.0.0.1:{audited_worker.port}",
            "PERF_ARGS=-i grpc --concurrency-range 1 --max-trials 1 --measurement-interval 500",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # one window can never be stable (it takes three), whatever the default of 10 would do
    assert done.returncode != 0
    assert "within 1 measurement windows" in done.stdout + done.stderr
    assert "Measurement window: 500 msec" in done.stdout


def test_the_openapi_document_names_exactly_the_routes_served(
    audited_worker: InProcessWorker,
) -> None:
    status, document = rest(audited_worker, "/v2/docs/dataplane.json")
    assert status == 200
    assert document["openapi"].startswith("3.")
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in audited_worker.worker.http.app.router.routes()  # the app the worker serves
        if route.method != "HEAD"
    }
    documented = {
        (method, path) for path, operations in document["paths"].items() for method in operations
    }
    assert documented == served


def test_the_openapi_document_is_valid_and_its_schemas_hold_what_the_door_sends(
    audited_worker: InProcessWorker,
) -> None:
    """A generator validates first: the document passes the OpenAPI validator, and a real
    request, its answer and a refusal each match the schema the document gives them."""
    from openapi_schema_validator import OAS30Validator
    from openapi_spec_validator import validate

    _, document = rest(audited_worker, "/v2/docs/dataplane.json")
    validate(document)

    def matches(name: str, instance: Any) -> None:
        schema = {**document["components"]["schemas"][name], "components": document["components"]}
        OAS30Validator(schema).validate(instance)

    def infer(features: int) -> dict[str, Any]:
        tensors = [("seed", "INT64", [1], [1]), ("x", "FP32", [3], [1.0, 2.0, 3.0])]
        tensors.append(("features", "INT64", [1], [features]))
        inputs = [{"name": n, "datatype": d, "shape": s, "data": v} for n, d, s, v in tensors]
        return {"id": "a", "inputs": inputs}

    path = "/v2/models/roundtrip/infer"
    matches("InferenceRequest", infer(4))
    status, answer = rest(audited_worker, path, infer(4))
    assert status == 200
    matches("InferenceResponse", answer)
    operation = document["paths"]["/v2/models/{model}/infer"]["post"]
    assert set(operation["responses"]) == {"200", "default"}
    status, refusal = rest(audited_worker, path, infer(0))
    assert status == 400
    matches("Error", refusal)
