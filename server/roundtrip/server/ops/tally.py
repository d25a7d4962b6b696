"""The worker's inference counters as Triton's statistics extension reports them.

>>> tally = InferenceTally()
>>> tally.observe_batch(2, [0.001, 0.002], 0.004)
>>> tally.inference_count, tally.execution_count, tally.batches[2].count
(2, 1, 1)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

#: The RPCs that carry inference requests: what Triton's statistics extension counts.
INFERENCE_METHODS = frozenset(
    {"RoundTrip", "RoundTripStream", "RoundTripBatch", "ModelInfer", "ModelInferHTTP"}
)


@dataclass(slots=True)
class Duration:
    """A count and the nanoseconds it took in all (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9) * count


@dataclass(slots=True)
class InferenceTally:
    """The worker's inference counters as Triton's statistics extension reports them: calls
    answered OK and not (with their durations), requests queued and computed, batches run
    by size. Fed by the same observations as the Prometheus metrics, on the event loop.

    >>> tally = InferenceTally()
    >>> tally.observe_call("RoundTrip", "OK", 0.002)
    >>> tally.success, tally.last_inference_ms > 0
    (Duration(count=1, ns=2000000), True)
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def observe_call(self, method: str, code: str, seconds: float, count: int = 1) -> None:
        if method not in INFERENCE_METHODS:
            return
        if code == "OK":
            self.success.add(seconds, count)
            self.last_inference_ms = int(time.time() * 1000)
        else:
            self.fail.add(seconds, count)

    def observe_batch(self, size: int, queue_seconds: Sequence[float], compute: float) -> None:
        self.execution_count += 1
        self.inference_count += size
        for seconds in queue_seconds:
            self.queue.add(seconds)
        self.compute_infer.add(compute, size)
        self.batches.setdefault(size, Duration()).add(compute)
