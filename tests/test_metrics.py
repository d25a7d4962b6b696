"""Prometheus metrics on their own port: names, values, and promtool's verdict."""

from __future__ import annotations

import re
import subprocess
import urllib.request

import pytest
from conftest import ROOT, WorkerProcess

from roundtrip.client import InvalidArgumentError, RoundTripClient
from roundtrip.server.metrics import METRIC_NAMES

PROMTOOL = ROOT / ".tools" / "promtool"


def scrape(worker: WorkerProcess) -> str:
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, flags=re.MULTILINE)
    assert match, f"{sample} not in the scrape"
    return float(match.group(1))


@pytest.fixture
def traffic(client: RoundTripClient) -> None:
    for seed in range(5):
        client.round_trip(seed, [1.0, 2.0, 3.0], 4)
    with pytest.raises(InvalidArgumentError):
        client.round_trip(0, [1.0, 2.0, 3.0], 0)
    list(client.stream([(1, [1.0], 2), (2, [1.0], 0)]))


def test_requests_are_counted_by_method_and_code(worker: WorkerProcess, traffic: None) -> None:
    text = scrape(worker)
    assert value(text, 'roundtrip_requests_total{code="OK",method="RoundTrip"}') >= 5
    assert value(text, 'roundtrip_requests_total{code="INVALID_ARGUMENT",method="RoundTrip"}') >= 1
    assert value(text, 'roundtrip_requests_total{code="OK",method="RoundTripStream"}') >= 1
    assert (
        value(text, 'roundtrip_requests_total{code="INVALID_ARGUMENT",method="RoundTripStream"}')
        >= 1
    )
    assert value(text, 'roundtrip_request_duration_seconds_count{method="RoundTrip"}') >= 6
    assert value(text, "roundtrip_inflight_requests") == 0


def test_engine_and_batching_are_visible(worker: WorkerProcess, traffic: None) -> None:
    text = scrape(worker)
    assert value(text, "roundtrip_batch_size_count") >= 1
    assert value(text, "roundtrip_queue_wait_seconds_count") >= 5
    assert value(text, "roundtrip_compilations_total") >= 1
    assert value(text, "roundtrip_compile_seconds_total") > 0
    assert value(text, "roundtrip_executable_cache_hits_total") >= 1
    assert value(text, "roundtrip_executable_cache_entries") >= 1
    assert value(text, "roundtrip_queued_requests") == 0


def test_every_documented_metric_is_exported(worker: WorkerProcess, traffic: None) -> None:
    text = scrape(worker)
    for name in METRIC_NAMES:
        assert re.search(rf"^# TYPE {name} ", text, re.MULTILINE), name


def test_promtool_accepts_the_metrics(worker: WorkerProcess, traffic: None) -> None:
    done = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=scrape(worker), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_metric_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = re.findall(r"^\| `(roundtrip_[a-z_]+)` \|", readme, flags=re.MULTILINE)
    assert sorted(documented) == sorted(METRIC_NAMES)
