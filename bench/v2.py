"""V2 (Open Inference Protocol) beside the worker's own RoundTrip, and beside MLServer's V2.

    python -m bench.v2 --rounds 3 --duration 10   # -> docs/bench/v2.json

W2 (64 -> 64), one body replayed by h2load, every server started afresh each round in an
order that flips every round:

* the worker's ``RoundTrip`` and its V2 ``ModelInfer`` (gRPC: 8 connections x 16 streams),
  and its V2 REST infer (HTTP/1.1, JSON body: 64 connections, one request at a time each);
* MLServer 1.7 serving the same computation (bench/mlserver/runtime.py, a jitted runtime,
  ``parallel_workers: 0`` so it computes in its server process as the worker does) from its
  own environment (``.tools/mlserver``, from bench/mlserver/requirements.txt), over the
  same V2 gRPC body and the same JSON body;
* the empty grpc.aio handler (the RPC ceiling), for scale.

Every body's answer is checked against the eager reference before its load. Ratios are of
medians over the rounds, measured side by side on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.run import (
    HTTP_PORTS,
    OUT,
    ROOT,
    _same,
    cases,
    check_body,
    h2load,
    h2load_body,
    machine,
    server,
)
from conftest import free_port
from roundtrip.server.v2proto import grpc_predict_v2_pb2 as v2pb

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MLSERVER_ENV = ROOT / ".tools" / "mlserver"
MLSERVER_LOCK = ROOT / "bench" / "mlserver" / "requirements.txt"
UV = ROOT / ".tools" / "bin" / "uv"


def v2_body(seed: int, x: np.ndarray, features: int) -> v2pb.ModelInferRequest:
    request = v2pb.ModelInferRequest(model_name="roundtrip")
    for name, datatype, data in (
        ("seed", "INT64", np.array([seed], "<i8")),
        ("x", "FP32", x.astype("<f4")),
        ("features", "INT64", np.array([features], "<i8")),
    ):
        request.inputs.add(name=name, datatype=datatype, shape=data.shape)
        request.raw_input_contents.append(data.tobytes())
    return request


def json_body(seed: int, x: np.ndarray, features: int) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "seed", "datatype": "INT64", "shape": [1], "data": [seed]},
                {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()},
                {"name": "features", "datatype": "INT64", "shape": [1], "data": [features]},
            ]
        }
    ).encode()


def check_v2(port: int, body: v2pb.ModelInferRequest, expected: tuple[float, ...]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            MODEL_INFER,
            request_serializer=v2pb.ModelInferRequest.SerializeToString,
            response_deserializer=v2pb.ModelInferResponse.FromString,
        )
        response = call(body, timeout=60)
    [tensor] = response.outputs
    if response.raw_output_contents:
        got = np.frombuffer(response.raw_output_contents[0], "<f4")
    else:
        got = np.asarray(tensor.contents.fp32_contents, np.float32)
    if not _same(tuple(float(v) for v in got), expected):
        raise AssertionError(f"V2 gRPC answer {got.tolist()} differs from {expected}")


def check_json(port: int, body: bytes, expected: tuple[float, ...]) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/roundtrip/infer", body)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        [tensor] = json.loads(response.read())["outputs"]
    got = tuple(float(np.float32(v)) for v in np.asarray(tensor["data"]).ravel())
    if not _same(got, expected):
        raise AssertionError(f"V2 REST answer {got} differs from {expected}")


def ensure_mlserver() -> Path:
    """MLServer's environment, from its lock (as make bench's other tools: installed here)."""
    marker = MLSERVER_ENV / ".synced"
    if not marker.exists() or marker.stat().st_mtime < MLSERVER_LOCK.stat().st_mtime:
        subprocess.run(
            [str(UV), "venv", "--quiet", "--allow-existing", str(MLSERVER_ENV)], check=True
        )
        subprocess.run(
            [
                str(UV),
                "pip",
                "install",
                "--quiet",
                "--python",
                str(MLSERVER_ENV / "bin" / "python"),
                "--require-hashes",
                "-r",
                str(MLSERVER_LOCK),
            ],
            check=True,
        )
        marker.touch()
    return MLSERVER_ENV / "bin" / "mlserver"


@contextmanager
def mlserver(executable: Path) -> Iterator[tuple[int, int]]:
    """MLServer on free ports; yields (grpc_port, http_port) once the model is ready."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="mlserver-"))
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "grpc_port": grpc_port,
                "http_port": http_port,
                "metrics_port": metrics_port,
                "parallel_workers": 0,
            }
        )
    )
    (folder / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "roundtrip",
                "implementation": "runtime.RoundTripRuntime",
                "parameters": {"extra": {"mode": "jit"}},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench" / "mlserver"), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [str(executable), "start", str(folder)],
        env=env,
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                url = f"http://127.0.0.1:{http_port}/v2/models/roundtrip/ready"
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("MLServer did not get ready")
            time.sleep(0.5)
        yield grpc_port, http_port
    finally:
        process.terminate()
        process.wait(60)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    executable = ensure_mlserver()
    w2 = cases(64, 64, 1, check=True)[0]
    assert w2.expected is not None
    x = np.frombuffer(w2.request.x.raw, "<f4")
    body = v2_body(w2.request.seed, x, w2.request.features)
    text = json_body(w2.request.seed, x, w2.request.features)
    runs: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)
        print(name, round(value, 1), flush=True)

    def grpc_load(port: int, message: Any, method: str) -> float:
        return h2load(port, message, duration=args.duration, clients=8, streams=16, method=method)[
            "rps"
        ]

    def rest_load(port: int) -> float:
        return h2load_body(
            f"http://127.0.0.1:{port}/v2/models/roundtrip/infer",
            text,
            ["content-type: application/json"],
            duration=args.duration,
            clients=64,
            streams=1,
            h1=True,
        )["rps"]

    for round_ in range(args.rounds):
        order = ["worker", "mlserver", "empty"]
        for kind in order if round_ % 2 == 0 else order[::-1]:
            if kind == "worker":
                with server("worker", "--warmup-shapes", "64:64") as port:
                    check_body(port, w2)
                    check_v2(port, body, w2.expected)
                    check_json(HTTP_PORTS[port], text, w2.expected)
                    record(
                        "RoundTrip, worker",
                        grpc_load(port, w2.request, "/roundtrip.v1.RoundTripService/RoundTrip"),
                    )
                    record("V2 gRPC ModelInfer, worker", grpc_load(port, body, MODEL_INFER))
                    record("V2 REST infer (JSON), worker", rest_load(HTTP_PORTS[port]))
            elif kind == "mlserver":
                with mlserver(executable) as (grpc_port, http_port):
                    check_v2(grpc_port, body, w2.expected)
                    check_json(http_port, text, w2.expected)
                    record("V2 gRPC ModelInfer, MLServer", grpc_load(grpc_port, body, MODEL_INFER))
                    record("V2 REST infer (JSON), MLServer", rest_load(http_port))
            else:
                with server("empty") as port:
                    record(
                        "RoundTrip, empty handler",
                        grpc_load(port, w2.request, "/roundtrip.v1.RoundTripService/RoundTrip"),
                    )
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratios = {
        "worker: V2 gRPC / RoundTrip": medians["V2 gRPC ModelInfer, worker"]
        / medians["RoundTrip, worker"],
        "V2 gRPC: worker / MLServer": medians["V2 gRPC ModelInfer, worker"]
        / medians["V2 gRPC ModelInfer, MLServer"],
        "V2 REST: worker / MLServer": medians["V2 REST infer (JSON), worker"]
        / medians["V2 REST infer (JSON), MLServer"],
        "worker V2 gRPC / empty handler": medians["V2 gRPC ModelInfer, worker"]
        / medians["RoundTrip, empty handler"],
    }
    report = {
        "runs": runs,
        "medians": medians,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "checks": "every body's answer (worker RoundTrip, V2 gRPC, V2 REST; MLServer V2 gRPC "
        "and REST) equal to the eager reference before its load",
        "mlserver": "1.7.1, jitted runtime (bench/mlserver/runtime.py), parallel_workers 0",
        "machine": machine(),
        "rounds": args.rounds,
        "duration_s": args.duration,
    }
    (OUT / "v2.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
