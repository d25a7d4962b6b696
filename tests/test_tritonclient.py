"""The real tritonclient, installed in its own environment as another team would (it pins an
older protobuf than the worker), gets the eager reference's bits through V2 gRPC and REST.

The environment is ``.tools/tritonclient``, from the hash-locked
``tests/tritonclient/requirements.txt`` (``make pytest`` builds it); the calls are made by
``tests/tritonclient/calls.py`` there, and compared here.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from reference import reference

from support.workers import ROOT, InProcessWorker, serving_worker

PYTHON = ROOT / ".tools" / "tritonclient" / "bin" / "python"
CALLS = ROOT / "tests" / "tritonclient" / "calls.py"
DTYPES = {
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
EDGE_SEEDS = [0, 1, -1, 42, 2**31 - 1, 2**31, -(2**31), 2**32, 2**32 + 7, 2**63 - 1, -(2**63)]
WAYS = ["grpc", "http", "http-json", "grpc-typed"]

pytestmark = [pytest.mark.slow, pytest.mark.external]


def generated_cases() -> list[dict[str, Any]]:
    """64 single requests: every dtype, ranks 1-3, edge seeds, each way in (typed contents
    only where V2 has them: FP32 and FP64), and one batched call of 32 per transport."""
    rng = np.random.default_rng(2026)
    cases = []
    for index in range(64):
        datatype = list(DTYPES)[index % 4]
        ways = WAYS if datatype in ("FP32", "FP64") else WAYS[:3]
        way = ways[(index // 4) % len(ways)]
        if way == "http-json" and datatype == "BF16":
            way = "http"  # tritonclient has no JSON form for BF16
        rank = 1 + index % 3
        shape = [int(n) for n in rng.integers(1, 5, size=rank - 1)] + [int(rng.integers(1, 9))]
        x = (rng.normal(size=shape) * 3).astype(DTYPES[datatype])
        cases.append(
            {
                "id": f"case-{index}",
                "way": way,
                "seed": [EDGE_SEEDS[index % len(EDGE_SEEDS)]],
                "features": [int(rng.integers(1, 9))],
                "datatype": datatype,
                "shape": shape,
                "x": x.astype(np.float64).ravel().tolist(),
            }
        )
    for way in ("grpc", "http"):
        x = rng.normal(size=(32, 2, 5)).astype(np.float32)
        cases.append(
            {
                "id": f"batch-{way}",
                "way": way,
                "seed": [int(seed) for seed in rng.integers(-(2**40), 2**40, size=32)],
                "features": [int(n) for n in rng.integers(1, 9, size=32)],
                "datatype": "FP32",
                "shape": [32, 2, 5],
                "x": x.astype(np.float64).ravel().tolist(),
            }
        )
    return cases


@pytest.fixture(scope="module")
def triton_worker() -> Iterator[InProcessWorker]:
    if not PYTHON.exists():
        pytest.fail(f"{PYTHON} is missing: `make pytest` builds it (tests/tritonclient)")
    with serving_worker("--warmup-shapes", "3:4") as process:
        yield process


def test_tritonclient_gets_the_reference_bits(triton_worker: InProcessWorker) -> None:
    cases = generated_cases()
    done = subprocess.run(
        [str(PYTHON), str(CALLS), triton_worker.target, f"127.0.0.1:{triton_worker.http_port}"],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout)
    for transport in ("grpc", "http"):
        assert said[transport] == {
            "server_live": True,
            "server_ready": True,
            "model_ready": True,
            "inputs": ["seed", "x", "features"],
        }
    assert len(said["answers"]) == len(cases) == 66
    seen_ways = set()
    for case in cases:
        x = np.asarray(case["x"]).astype(DTYPES[case["datatype"]]).reshape(case["shape"])
        rows = x if len(case["seed"]) > 1 else [x]
        answer = np.asarray(said["answers"][case["id"]], dtype=np.float64)
        assert answer.shape == (len(case["seed"]), 3)
        for row, seed, features, got in zip(
            rows, case["seed"], case["features"] * len(case["seed"]), answer, strict=False
        ):
            expected = reference(seed, row, features)
            assert np.array_equal(got.view(np.int64), expected.view(np.int64)), case["id"]
        seen_ways.add((case["way"], case["datatype"]))
    assert {way for way, _ in seen_ways} == set(WAYS)
    assert {datatype for _, datatype in seen_ways} == set(DTYPES)
