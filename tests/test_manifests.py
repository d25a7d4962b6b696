"""The rendered manifests do what they say: what each selector selects, whom the policy admits.

Schema validation and checkov (``make deploy-check``) accept a NetworkPolicy
that lets no client in and a PodDisruptionBudget that protects no pod; these
tests read the YAML that ``kubectl kustomize`` renders, as the cluster would.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Mapping
from functools import cache
from typing import Any

import pytest
import yaml

from roundtrip.client import __version__
from roundtrip.server.config import WorkerConfig
from roundtrip.server.numerics.numerics import ISA_LEVELS
from support.workers import ROOT

KUBECTL = ROOT / ".tools" / "kubectl" / "kubectl"
OVERLAYS = (
    "base",
    "overlays/gpu",
    "overlays/tls",
    "overlays/monitoring",
    "overlays/tracing",
    "overlays/keda",
    "overlays/hpa-custom",
)
NAMESPACE = "roundtrip"
GRPC_PORT, HTTP_PORT, METRICS_PORT = 50051, 8000, 9464
Labels = Mapping[str, str]

pytestmark = pytest.mark.external


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(ROOT / "deploy" / "k8s" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(overlay: str, kind: str) -> dict[str, Any]:
    [found] = [doc for doc in rendered(overlay) if doc["kind"] == kind]
    return found


def selects(selector: Mapping[str, Any] | None, labels: Labels) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions).

    An absent selector selects nothing here: a PDB or Service without one
    protects or routes to no pod, which is exactly the mistake to catch.
    """
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Labels
    namespace_labels: Labels = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:  # the label every namespace carries since 1.22
        object.__setattr__(
            self,
            "namespace_labels",
            {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels},
        )


def peer_matches(peer: Mapping[str, Any], source: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # pod traffic is judged by selectors
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], source.namespace_labels):
            return False
    elif source.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], source.labels)


def admits(policy: Mapping[str, Any], source: Pod, target: Pod, port: int) -> bool:
    """Whether ``policy`` lets ``source`` reach ``target`` on TCP ``port``."""
    namespace = policy["metadata"]["namespace"]
    spec = policy["spec"]
    if target.namespace != namespace or not selects(spec["podSelector"], target.labels):
        return True  # not a pod this policy isolates
    return any_rule_lets(spec.get("ingress", []), "from", source, port, "TCP", namespace)


def any_rule_lets(
    rules: list[Mapping[str, Any]],
    peers_key: str,
    peer: Pod,
    port: int,
    protocol: str,
    namespace: str,
) -> bool:
    """Whether one of a policy's ingress (``from``) or egress (``to``) ``rules`` lets traffic
    with ``peer`` through on ``port`` over ``protocol``."""
    for rule in rules:
        ports = rule.get("ports")
        if ports and not any(
            p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
        ):
            continue
        peers = rule.get(peers_key)
        if not peers or any(peer_matches(each, peer, namespace) for each in peers):
            return True
    return False


def worker_pod(overlay: str) -> Pod:
    labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return Pod(NAMESPACE, labels)


def container(overlay: str) -> dict[str, Any]:
    worker: dict[str, Any]
    [worker] = one(overlay, "Deployment")["spec"]["template"]["spec"]["containers"]
    return worker


def knob_value(overlay: str, knob: str) -> float:
    """A knob as the rendered container sets it, or its default."""
    env = {item["name"]: item.get("value") for item in container(overlay).get("env", [])}
    default = next(f.default for f in dataclasses.fields(WorkerConfig) if f.name == knob)
    return float(env.get("ROUNDTRIP_" + knob.upper(), default))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_selector_selects_the_worker_pods(overlay: str) -> None:
    deployment = one(overlay, "Deployment")
    pod = worker_pod(overlay)
    assert selects(deployment["spec"]["selector"], pod.labels)
    for doc in rendered(overlay):
        kind = doc["kind"]
        if kind == "Service":
            assert selects({"matchLabels": doc["spec"].get("selector")}, pod.labels), doc
            assert doc["spec"].get("selector"), f"Service {doc['metadata']['name']} selects nothing"
        elif kind in ("PodDisruptionBudget", "PodMonitor"):
            assert selects(doc["spec"].get("selector"), pod.labels), doc
        elif kind == "NetworkPolicy":
            assert selects(doc["spec"]["podSelector"], pod.labels), doc
            assert doc["spec"]["podSelector"], "an empty podSelector fences every pod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_network_policy_admits_clients_and_the_scraper_and_nothing_else(
    overlay: str,
) -> None:
    policy = one(overlay, "NetworkPolicy")
    worker = worker_pod(overlay)
    client = {"roundtrip-client": "true"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    cases = [
        (Pod(NAMESPACE, client), GRPC_PORT, True),  # a client beside the workers
        (Pod(NAMESPACE, client), HTTP_PORT, True),  # ... and its V2 REST calls
        (Pod("shop", client, {"roundtrip-client": "true"}), HTTP_PORT, True),
        (Pod("monitoring", prometheus), HTTP_PORT, False),
        (Pod(NAMESPACE, {"app": "other"}), HTTP_PORT, False),
        (Pod("shop", client, {"roundtrip-client": "true"}), GRPC_PORT, True),  # granted namespace
        (Pod("monitoring", prometheus), METRICS_PORT, True),  # the scraper
        (Pod("shop", client), GRPC_PORT, False),  # a labelled pod in a namespace not granted
        (Pod(NAMESPACE, {"app": "other"}), GRPC_PORT, False),  # an unlabelled neighbour
        (Pod(NAMESPACE, client), METRICS_PORT, False),  # clients do not read metrics
        (Pod("monitoring", prometheus), GRPC_PORT, False),  # the scraper does not call
        (Pod("default", prometheus), METRICS_PORT, False),  # a "prometheus" elsewhere
        (Pod(NAMESPACE, dict(worker.labels)), GRPC_PORT, False),  # workers are not clients
    ]
    for source, port, expected in cases:
        assert admits(policy, source, worker, port) is expected, (source, port)
    assert "Egress" in policy["spec"]["policyTypes"]


COLLECTOR = Pod("observability", {"app.kubernetes.io/name": "opentelemetry-collector"})
DNS = Pod("kube-system", {"k8s-app": "kube-dns"})


def lets_out(policy: Mapping[str, Any], target: Pod, port: int, protocol: str = "TCP") -> bool:
    """Whether ``policy`` lets the worker pods reach ``target`` on ``port``."""
    if "Egress" not in policy["spec"].get("policyTypes", []):
        return True
    namespace = policy["metadata"]["namespace"]
    return any_rule_lets(policy["spec"].get("egress", []), "to", target, port, protocol, namespace)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_worker_reaches_nothing_but_its_collector_when_it_traces(overlay: str) -> None:
    """The worker opens no connection; with the tracing component, only to the collector's
    OTLP/gRPC port and to the cluster DNS that resolves its name."""
    policy = one(overlay, "NetworkPolicy")
    tracing = overlay == "overlays/tracing"
    cases = [
        (COLLECTOR, 4317, "TCP", tracing),
        (DNS, 53, "UDP", tracing),
        (DNS, 53, "TCP", tracing),
        (COLLECTOR, 4318, "TCP", False),  # its other ports
        (Pod("observability", {"app.kubernetes.io/name": "jaeger"}), 4317, "TCP", False),
        (Pod("default", {"app.kubernetes.io/name": "opentelemetry-collector"}), 4317, "TCP", False),
        (Pod(NAMESPACE, {"roundtrip-client": "true"}), 50051, "TCP", False),
        (Pod("kube-system", {"k8s-app": "other"}), 53, "UDP", False),
    ]
    for target, port, protocol, expected in cases:
        assert lets_out(policy, target, port, protocol) is expected, (target, port, protocol)


def test_the_tracing_overlay_turns_tracing_on_towards_the_port_it_may_reach() -> None:
    from roundtrip.server.ops.tracing import TraceSettings

    pod = {"metadata.name": "w", "metadata.namespace": NAMESPACE, "spec.nodeName": "n"}
    settings = TraceSettings.from_environ(expanded_env("overlays/tracing", pod))
    assert (settings.enabled, settings.protocol) == (True, "grpc")
    assert settings.endpoint.endswith(":4317")
    assert lets_out(one("overlays/tracing", "NetworkPolicy"), COLLECTOR, 4317)
    assert not TraceSettings.from_environ(expanded_env("base", pod)).enabled  # off by default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_policy_ports_are_the_ports_the_worker_listens_on(overlay: str) -> None:
    ports = {p["name"]: p["containerPort"] for p in container(overlay)["ports"]}
    assert ports["grpc"] == GRPC_PORT == knob_value(overlay, "port")
    assert ports["metrics"] == METRICS_PORT == knob_value(overlay, "metrics_port")
    assert ports["http"] == HTTP_PORT == knob_value(overlay, "http_port")
    service = next(d for d in rendered(overlay) if d["metadata"]["name"] == "roundtrip")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": GRPC_PORT,
        "http": HTTP_PORT,
    }
    for doc in rendered(overlay):
        if doc["kind"] == "PodMonitor":
            assert {e["port"] for e in doc["spec"]["podMetricsEndpoints"]} == {"metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_outlives_its_drain_and_readiness_sees_it_in_time(overlay: str) -> None:
    announce = knob_value(overlay, "drain_announce_s")
    grace = knob_value(overlay, "drain_grace_s")
    spec = one(overlay, "Deployment")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= announce + grace + 5
    readiness = container(overlay)["readinessProbe"]
    detected = readiness["periodSeconds"] * readiness["failureThreshold"]
    detected += readiness.get("timeoutSeconds", 1)
    assert detected + 2 <= announce, "endpoints must drop the pod before it refuses calls"
    assert readiness["failureThreshold"] >= 2, "one slow answer must not take a pod out"
    startup = container(overlay)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # warm-up: 35 s here


MESH_SECTION = (ROOT / "docs" / "deploy.md").read_text().split("## Service meshes")[1]


def test_the_mesh_sidecar_outlives_the_drain_within_the_pods_grace() -> None:
    """docs/deploy.md's sidecar settings: longer than the worker's drain, shorter than the
    pod's grace; and the gRPC ports say they are gRPC, so no mesh has to guess."""
    announce = knob_value("base", "drain_announce_s")
    grace = knob_value("base", "drain_grace_s")
    spec = one("base", "Deployment")["spec"]["template"]["spec"]
    istio = re.search(r"terminationDrainDuration: (\d+)s", MESH_SECTION)
    linkerd = re.search(r'proxy-wait-before-exit-seconds: "(\d+)"', MESH_SECTION)
    assert istio is not None
    assert linkerd is not None
    for seconds in (int(istio[1]), int(linkerd[1])):
        assert announce + grace < seconds < spec["terminationGracePeriodSeconds"]
    for service in (doc for doc in rendered("base") if doc["kind"] == "Service"):
        [grpc_port] = [port for port in service["spec"]["ports"] if port["port"] == 50051]
        assert (grpc_port["name"], grpc_port["appProtocol"]) == ("grpc", "grpc")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_image_is_fully_qualified(overlay: str) -> None:
    # Pulled Always (checkov's CKV_K8S_15), so the name must not resolve to some
    # other registry's image of the same short name (docker.io/library/...).
    image = container(overlay)["image"]
    registry, _, rest = image.partition("/")
    assert "." in registry or ":" in registry, f"{image}: no registry host"
    assert "@sha256:" in rest or ":" in rest, f"{image}: no tag or digest"
    assert container(overlay)["imagePullPolicy"] == "Always"


def test_the_monitoring_overlay_adds_a_pod_monitor() -> None:
    assert [d["kind"] for d in rendered("overlays/monitoring")].count("PodMonitor") == 1
    assert "PodMonitor" not in [d["kind"] for d in rendered("base")]  # base needs no CRDs


def test_the_gpu_overlay_runs_the_cuda_image_on_a_gpu() -> None:
    assert container("overlays/gpu")["image"].endswith("-cuda")
    assert container("overlays/gpu")["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert not container("base")["image"].endswith("-cuda")


def test_gpu_pods_choose_kernels_without_timing_them() -> None:
    """XLA's autotuner times candidate GPU kernels and keeps the fastest, so two processes
    can answer one request with different bits; off, one GPU model gives one fingerprint.
    The cuda image sets the same, for pods run from it without these manifests."""
    env = {item["name"]: item.get("value") for item in container("overlays/gpu")["env"]}
    assert "--xla_gpu_autotune_level=0" in env["XLA_FLAGS"].split()
    assert "XLA_FLAGS" not in {item["name"] for item in container("base")["env"]}
    cuda_stage = (ROOT / "Dockerfile").read_text().split("FROM runtime AS cuda")[1]
    assert "XLA_FLAGS=--xla_gpu_autotune_level=0" in cuda_stage.split("FROM ")[0]


def test_the_image_carries_the_distributions_name_and_version() -> None:
    """One version: the package's, the manifests' tag and the image's labels agree."""
    assert container("base")["image"] == f"registry.example.com/roundtrip-worker:{__version__}"
    assert container("overlays/gpu")["image"].endswith(f":{__version__}-cuda")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'org.opencontainers.image.title="roundtrip-worker"' in dockerfile
    assert f'org.opencontainers.image.version="{__version__}"' in dockerfile


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_pins_the_cpu_instruction_set(overlay: str) -> None:
    """One fingerprint per fleet: the documented pin (AVX2), a level the worker accepts."""
    env = {item["name"]: item.get("value") for item in container(overlay).get("env", [])}
    assert env["ROUNDTRIP_XLA_CPU_MAX_ISA"] == "AVX2"
    knob = {"ROUNDTRIP_XLA_CPU_MAX_ISA": env["ROUNDTRIP_XLA_CPU_MAX_ISA"]}
    assert WorkerConfig.from_sources([], environ=knob).xla_cpu_max_isa in ISA_LEVELS


def expanded_env(overlay: str, pod: Mapping[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet gives it: downward API fields from
    ``pod`` (by field path), and ``$(NAME)`` replaced by variables defined above it."""
    env: dict[str, str] = {}
    for item in container(overlay).get("env", []):
        if "valueFrom" in item:
            env[item["name"]] = pod[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = str(item["value"])
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            env[item["name"]] = value
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_span_names_the_pod_namespace_and_node_it_came_from(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from roundtrip.server.ops.trace_export import resource

    pod = {"metadata.name": "worker-7f9c", "metadata.namespace": "ml", "spec.nodeName": "n-3"}
    for name, value in expanded_env(overlay, pod).items():
        monkeypatch.setenv(name, value)
    attributes = resource(__version__).attributes
    assert attributes["k8s.pod.name"] == "worker-7f9c"
    assert attributes["k8s.namespace.name"] == "ml"
    assert attributes["k8s.node.name"] == "n-3"
    assert attributes["service.name"] == "roundtrip-worker"
    assert attributes["service.version"] == __version__
