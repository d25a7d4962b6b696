"""The audit re-runs sampled answers through the eager reference, off the hot path."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Iterator

import numpy as np
import pytest

from roundtrip.client import RoundTripClient
from roundtrip.server.engine.audit import Auditor, AuditOutcome
from roundtrip.server.numerics.reference import eager_round_trip
from roundtrip.server.values import RoundTripInput
from support.workers import InProcessWorker, metric_value, serving_worker

ITEM = RoundTripInput(seed=7, x=np.array([[1.0, -2.0], [0.5, 4.0]], np.float32), features=3)


def test_a_right_answer_matches() -> None:
    assert Auditor(1.0, 4).check(ITEM, eager_round_trip(7, ITEM.x, 3)).matched


def test_a_wrong_answer_in_one_bit_is_caught_and_logged_with_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    right = eager_round_trip(7, ITEM.x, 3)
    wrong = dataclasses.replace(right, merged_sum=float(np.nextafter(right.merged_sum, np.inf)))
    with caplog.at_level(logging.ERROR, logger="roundtrip.server.engine.audit"):
        assert not Auditor(1.0, 4).check(ITEM, wrong).matched
    (record,) = caplog.records
    assert record.getMessage().startswith("audit mismatch")
    assert record.request == {  # type: ignore[attr-defined]  # logging's extra= field
        "seed": 7,
        "features": 3,
        "dtype": "float32",
        "shape": [2, 2],
        "x": [1.0, -2.0, 0.5, 4.0],
    }


def test_the_fraction_is_sampled_and_a_full_queue_skips_instead_of_waiting() -> None:
    skipped: list[None] = []
    auditor = Auditor(0.25, 10, on_skipped=lambda: skipped.append(None), rng=random.Random(1))
    result = eager_round_trip(7, ITEM.x, 3)
    for _ in range(400):  # the thread is not started: nothing leaves the queue
        auditor.offer(ITEM, result)
    assert len(skipped) > 50  # about 100 sampled, 10 queued, the rest skipped at once
    off = Auditor(0.0, 10, on_skipped=lambda: skipped.append(None))
    before = len(skipped)
    for _ in range(100):
        off.offer(ITEM, result)
    assert len(skipped) == before


def test_the_background_thread_reports_each_outcome() -> None:
    outcomes: list[AuditOutcome] = []
    auditor = Auditor(1.0, 16, on_outcome=outcomes.append)
    auditor.start()
    result = eager_round_trip(7, ITEM.x, 3)
    for _ in range(5):
        auditor.offer(ITEM, result)
    deadline = time.monotonic() + 60
    while len(outcomes) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    auditor.stop()
    assert outcomes == [AuditOutcome(matched=True)] * 5


@pytest.fixture(scope="module")
def audited_worker() -> Iterator[InProcessWorker]:
    with serving_worker("--warmup-shapes", "3:4", "--audit-fraction", "1") as process:
        yield process


def test_a_worker_auditing_everything_finds_its_answers_exact(
    audited_worker: InProcessWorker,
) -> None:
    rng = np.random.default_rng(4)
    requests = [
        (int(seed), rng.standard_normal(shape).astype(np.float32), int(features))
        for seed, shape, features in zip(
            rng.integers(-(2**63), 2**63 - 1, 60, dtype=np.int64),
            [(3,), (1,), (2, 5), (64,)] * 15,
            [4, 1, 7, 64] * 15,
            strict=True,
        )
    ]
    with RoundTripClient(audited_worker.target, timeout=60) as client:
        list(client.stream(requests))
        for seed, x, features in requests[:10]:
            client.round_trip(seed, x, features)
    deadline = time.monotonic() + 120
    while metric_value(audited_worker.scrape(), "roundtrip_audit_checks_total") < 70:
        assert time.monotonic() < deadline, "the audit did not get through its samples"
        time.sleep(0.2)
    text = audited_worker.scrape()
    assert metric_value(text, "roundtrip_audit_mismatches_total") == 0
    assert (
        metric_value(text, "roundtrip_audit_checks_total")
        + metric_value(text, "roundtrip_audit_skipped_total")
        == 70
    )
    assert audited_worker.terminate() == 0
    (stopped,) = [e for e in audited_worker.events if e.get("event") == "stopped"]
    assert stopped["audited"] == metric_value(text, "roundtrip_audit_checks_total"), json.dumps(
        stopped
    )
    assert stopped["audit_mismatches"] == 0, json.dumps(stopped)
