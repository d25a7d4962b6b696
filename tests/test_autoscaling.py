"""Autoscaling on the worker's own signal: the counters count what they say, the overlays
scale the Deployment on one of them and outlive its drain, and every PromQL query the
manifests and docs use gives the right answer from series recorded off a real worker
(``promtool test rules``).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_manifests import NAMESPACE, knob_value, one, rendered

from roundtrip.client import ResourceExhaustedError, RoundTripClient, RoundTripError
from support.polling import wait_for
from support.workers import ROOT, InProcessWorker, busy_lane, serving_worker

PROMTOOL = ROOT / ".tools" / "promtool"
ADAPTER_RULES = (
    ROOT / "deploy" / "k8s" / "overlays" / "hpa-custom" / "prometheus-adapter-rules.yaml"
)
DOCS = ("docs/autoscaling.md", "docs/operations.md", "README.md")
AUTOSCALED = ("overlays/keda", "overlays/hpa-custom")
#: The series labels the Prometheus Operator's PodMonitor adds to what a pod exports.
POD = {
    "namespace": NAMESPACE,
    "pod": "roundtrip-7d9f-abcde",
    "container": "worker",
    "job": f"{NAMESPACE}/roundtrip",
    "endpoint": "metrics",
}
SCRAPES, INTERVAL_S = 12, 15
#: promtool evaluates at the last recorded scrape.
EVAL_TIME = f"{(SCRAPES - 1) * INTERVAL_S}s"
TOKEN = "s3cret-token"

pytestmark = pytest.mark.external


def scaled_object() -> dict[str, Any]:
    return one("overlays/keda", "ScaledObject")


def drain_s(overlay: str) -> float:
    return knob_value(overlay, "drain_announce_s") + knob_value(overlay, "drain_grace_s")


def adapter_rule() -> dict[str, Any]:
    [rule] = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    return dict(rule)


def test_keda_scales_the_deployment_on_how_busy_the_pods_are_and_owns_its_hpa() -> None:
    spec = scaled_object()["spec"]
    deployment = one("overlays/keda", "Deployment")["metadata"]["name"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment,
    }
    assert spec["minReplicaCount"] >= 1  # warm-up makes scale-from-zero slow
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"
    assert "roundtrip_busy_seconds_total" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) == documented_target()
    kinds = [doc["kind"] for doc in rendered("overlays/keda")]
    assert "HorizontalPodAutoscaler" not in kinds  # two HPAs on one Deployment fight


def test_the_custom_metric_hpa_scales_on_what_the_adapter_rule_serves() -> None:
    hpa = one("overlays/hpa-custom", "HorizontalPodAutoscaler")["spec"]
    assert (
        hpa["scaleTargetRef"]["name"]
        == one("overlays/hpa-custom", "Deployment")["metadata"]["name"]
    )
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    assert float(target["averageValue"]) == documented_target()


@pytest.mark.parametrize("overlay", AUTOSCALED)
def test_scale_down_waits_longer_than_a_drain_and_clients_find_new_pods_soon(overlay: str) -> None:
    if overlay == "overlays/keda":
        behavior = scaled_object()["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    else:
        behavior = one(overlay, "HorizontalPodAutoscaler")["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > drain_s(overlay)
    # clients re-resolve a headless Service when a connection ends: a new pod gets calls
    # within max_connection_age_s of becoming ready
    assert knob_value(overlay, "max_connection_age_s") <= 60


def documented_target() -> float:
    """The per-pod target docs/autoscaling.md gives."""
    text = (ROOT / "docs" / "autoscaling.md").read_text()
    match = re.search(r"The shipped target: busy (\d\.\d+) per pod", text)
    assert match, "docs/autoscaling.md states the shipped target"
    return float(match.group(1))


# --- every query, run by promtool on series recorded off a worker under load -------------


def queries() -> dict[str, str]:
    """Every PromQL expression of the manifests and the docs, by where it is; a trailing
    comparison (an alert's threshold) dropped: what is tested is that it selects series."""
    found = {"keda trigger": scaled_object()["spec"]["triggers"][0]["metadata"]["query"]}
    rule = adapter_rule()
    series = rule["seriesQuery"].strip("'")
    found["adapter seriesQuery"] = series
    found["adapter metricsQuery"] = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series.split("{")[0])
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD["pod"]}"')
        .replace("<<.GroupBy>>", "pod")
    )
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        blocks = re.findall(r"```promql\n(.*?)```", text, flags=re.DOTALL)
        inline = [q for q in re.findall(r"`([^`\n]+)`", text) if "(" in q and "roundtrip_" in q]
        for index, query in enumerate([*blocks, *inline]):
            query = re.sub(r"\s*(>|<)\s*(SLO|[\d.]+)\s*$", "", query.strip())
            found[f"{doc} #{index}"] = query
    return found


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float | None]]:
    """Every series a worker exported over :data:`SCRAPES` scrapes under load (calls OK,
    refused for a full queue and for a missing token), by its text with the pod's labels."""
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN)
    series: dict[str, list[float | None]] = {}
    flags = ("--warmup-shapes", "3:4", "--max-queue-size", "1", "--auth-token-file", str(token))
    with serving_worker(*flags) as worker:
        for scrape in range(SCRAPES):
            traffic(worker, refusals=scrape == SCRAPES // 2)
            for family in text_string_to_metric_families(worker.scrape()):
                for sample in family.samples:
                    labels = {**sample.labels, **POD}
                    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                    values = series.setdefault(f"{sample.name}{{{inner}}}", [None] * SCRAPES)
                    values[scrape] = sample.value
    return series


def traffic(worker: InProcessWorker, *, refusals: bool) -> None:
    """Calls answered OK; with ``refusals``, calls refused for a full queue (the compute
    lane held) and one without the token."""
    with RoundTripClient(worker.target, token=TOKEN, timeout=30) as client:
        for seed in range(8):
            client.round_trip(seed, [1.0, 2.0, 3.0], 4)
        if not refusals:
            return
        calls = [threading.Thread(target=_refused_or_ok, args=(client,)) for _ in range(4)]
        with busy_lane(worker):
            for call in calls:
                call.start()
            for call in calls:
                call.join(2)
        for call in calls:
            call.join(30)
    with RoundTripClient(worker.target, timeout=30) as stranger, pytest.raises(RoundTripError):
        stranger.round_trip(1, [1.0], 2)  # no token: UNAUTHENTICATED


def _refused_or_ok(client: RoundTripClient) -> None:
    """One call while the queue is full: refused RESOURCE_EXHAUSTED (or, the first, queued
    and answered)."""
    with contextlib.suppress(ResourceExhaustedError):
        client.round_trip(1, [1.0, 2.0, 3.0], 4, timeout=30)


def any_value(query: str) -> str:
    """``query`` with each ``label="value"`` matcher made ``label=~".+"``.

    >>> any_value('rate(x{code="INTERNAL",pod=~"a"}[5m])')
    'rate(x{code=~".+",pod=~"a"}[5m])'
    """
    return re.sub(r'(\w+)="[^"]*"', r'\1=~".+"', query)


def rate_over_last_minute(values: list[float | None]) -> float:
    """What ``rate(x[1m])`` gives at the last scrape: samples every 15 s, the window holds
    five, its ends on samples, so no extrapolation."""
    last, first = values[-1], values[-1 - 60 // INTERVAL_S]
    assert last is not None
    assert first is not None
    return (last - first) / 60


def promtool_test(
    recorded: dict[str, list[float | None]], tests: list[dict[str, Any]], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    def shown(values: list[float | None]) -> str:
        return " ".join("_" if v is None else repr(v) for v in values)

    document = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": f"{INTERVAL_S}s",
                "input_series": [{"series": s, "values": shown(v)} for s, v in recorded.items()],
                "promql_expr_test": tests,
            }
        ],
    }
    path = tmp_path / "queries_test.yaml"
    path.write_text(yaml.safe_dump(document, width=10_000))
    return subprocess.run(
        [str(PROMTOOL), "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )


def test_the_scaling_signal_queries_give_how_busy_the_pod_was(
    recorded: dict[str, list[float | None]], tmp_path: Path
) -> None:
    """The KEDA query and the adapter's metric read, for the recorded pod, exactly the share
    of the last minute it had a request in flight, as the worker's counter gives it."""
    [counter] = [s for s in recorded if s.startswith("roundtrip_busy_seconds_total{")]
    expected = rate_over_last_minute(recorded[counter])
    assert 0 < expected <= 1

    found = queries()
    tests = [
        {
            "expr": f"abs(({found[name]}) - {expected!r}) < bool 1e-9",
            "eval_time": EVAL_TIME,
            "exp_samples": [{"labels": labels, "value": 1}],
        }
        for name, labels in (
            ("keda trigger", "{}"),
            ("adapter metricsQuery", f'{{pod="{POD["pod"]}"}}'),
        )
    ]
    done = promtool_test(recorded, tests, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_query_of_the_manifests_and_docs_selects_what_the_worker_exports(
    recorded: dict[str, list[float | None]], tmp_path: Path
) -> None:
    """A renamed metric, a wrong label or a typo leaves a query empty: promtool fails it.
    A label's value (an alert's code="INTERNAL") is relaxed to any value, since the worker
    never answered INTERNAL while recorded; a code it names must be a gRPC status code."""

    for query in queries().values():
        for code in re.findall(r'code="(\w+)"', query):
            assert code in grpc.StatusCode.__members__, (code, query)
    tests = [
        {
            "expr": f"count({any_value(query)}) > bool 0",
            "eval_time": EVAL_TIME,
            "exp_samples": [{"labels": "{}", "value": 1}],
        }
        for query in queries().values()
    ]
    assert len(tests) >= 8
    done = promtool_test(recorded, tests, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_counters_add_the_seconds_requests_spent_in_flight_and_the_worker_was_busy() -> None:
    """Five calls held in flight for a second (the compute lane busy) add five
    request-seconds in flight and one second busy; the gauge reads five while they wait;
    an idle second adds nothing."""
    hold_s = 1.0
    with serving_worker("--warmup-shapes", "3:4") as worker:
        counters = ("roundtrip_inflight_seconds_total", "roundtrip_busy_seconds_total")
        before = [worker.metric(counter) for counter in counters]
        time.sleep(hold_s)
        idle = [worker.metric(counter) - was for counter, was in zip(counters, before, strict=True)]
        with RoundTripClient(worker.target, timeout=30) as client, busy_lane(worker) as release:
            calls = [
                threading.Thread(target=client.round_trip, args=(seed, [1.0, 2.0, 3.0], 4))
                for seed in range(5)
            ]
            for call in calls:
                call.start()
            wait_for(lambda: worker.metric("roundtrip_inflight_requests") == 5, "five queued")
            time.sleep(hold_s)
            release.set()
            for call in calls:
                call.join(30)
        inflight, busy = [
            worker.metric(counter) - was for counter, was in zip(counters, before, strict=True)
        ]
    assert idle == [0.0, 0.0]
    assert 5 * hold_s <= inflight < 5 * (hold_s + 1.0), inflight
    assert hold_s <= busy < hold_s + 1.0, busy
