"""The KServe example (deploy/kserve) as KServe would run it: its predictor's pod is a valid
Pod, its ports and probes are the ones the worker it configures listens on and answers, and
it runs the same image as the plain manifests.

No KServe here (no cluster): the InferenceService itself is checked for what it says, and
the pod it describes against Kubernetes' own schema (kubernetes-validate).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from functools import cache
from typing import Any

import pytest
import yaml
from test_manifests import container as plain_container

from roundtrip.server.config import WorkerConfig
from support.workers import ROOT, WorkerProcess, free_port

KUBECTL = ROOT / ".tools" / "kubectl" / "kubectl"
VALIDATE = ROOT / ".tools" / "validate" / "bin" / "kubernetes-validate"
#: Fields of KServe's predictor spec that are not PodSpec fields (kserve 0.16's
#: V1beta1PredictorSpec, less those it shares with PodSpec).
KSERVE_ONLY = {
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleTarget",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "annotations",
    "labels",
}

pytestmark = [pytest.mark.slow, pytest.mark.external]


@cache
def inference_service() -> dict[str, Any]:
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(ROOT / "deploy" / "kserve")],
        capture_output=True,
        text=True,
        check=True,
    )
    isvc: dict[str, Any]
    [isvc] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    return isvc


def predictor_container() -> dict[str, Any]:
    container: dict[str, Any]
    [container] = inference_service()["spec"]["predictor"]["containers"]
    return container


def env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in predictor_container()["env"]}


def test_the_predictor_pod_is_a_valid_pod(tmp_path: Any) -> None:
    predictor = inference_service()["spec"]["predictor"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "roundtrip-predictor"},
        "spec": {key: value for key, value in predictor.items() if key not in KSERVE_ONLY},
    }
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    done = subprocess.run(
        [str(VALIDATE), "--strict", str(manifest)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_its_knobs_are_valid_and_its_ports_are_the_workers() -> None:
    config = WorkerConfig.from_sources([], environ=env())
    ports = {port["name"]: port["containerPort"] for port in predictor_container()["ports"]}
    # KServe routes gRPC to the port named h2c; REST to the other one
    assert ports == {"http1": config.http_port, "h2c": config.port}
    assert config.host == "0.0.0.0"
    assert config.xla_cpu_max_isa == "AVX2"  # the plain manifests' pin
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert predictor_container()[probe]["httpGet"]["port"] == config.http_port


def test_it_runs_the_image_of_the_plain_manifests() -> None:
    assert predictor_container()["image"] == plain_container("base")["image"]
    annotations = inference_service()["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"  # both ports


def get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            json.loads(response.read())
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


def test_its_probes_are_answered_by_the_worker_it_configures() -> None:
    """The worker started with the predictor's environment (ports moved to free ones, on
    loopback) answers each probe's path with 200 once serving (tests/test_v2.py: 503 before
    its self-check and while it drains)."""
    http_port = free_port()
    flags = []
    for name, value in env().items():
        if name.startswith("ROUNDTRIP_") and name not in (
            "ROUNDTRIP_HOST",
            "ROUNDTRIP_PORT",
            "ROUNDTRIP_HTTP_PORT",
            "ROUNDTRIP_METRICS_PORT",
            "ROUNDTRIP_COMPILATION_CACHE_DIR",
        ):
            flags += ["--" + name.removeprefix("ROUNDTRIP_").lower().replace("_", "-"), value]
    process = WorkerProcess(*flags, "--http-port", str(http_port))
    try:
        probes = {
            probe: predictor_container()[probe]["httpGet"]["path"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        assert get(http_port, probes["livenessProbe"]) == 200
        process.wait_serving()
        deadline = time.monotonic() + 10
        while get(http_port, probes["readinessProbe"]) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        for path in probes.values():
            assert get(http_port, path) == 200, path
        assert process.terminate() == 0
    finally:
        process.kill()
