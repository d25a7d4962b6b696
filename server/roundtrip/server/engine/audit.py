"""The audit: a sample of live answers re-run through the eager reference, bit for bit.

The warm-up self-check proves exactness on a handful of inputs before the
worker serves; the audit keeps proving it on the traffic it actually gets.
:meth:`Auditor.offer` is called on the event loop for every answer and costs a
random draw; sampled requests go through a bounded queue to one background
thread that runs :func:`~roundtrip.server.numerics.reference.eager_round_trip`, so the
audit never delays an answer. When the queue is full a sample is skipped (and
counted), never waited for.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from roundtrip.server.numerics.reference import eager_round_trip, same_answer
from roundtrip.server.values import RoundTripAnswer, RoundTripInput

log = logging.getLogger(__name__)

#: x is logged whole up to this many elements, as a SHA-256 of its bytes beyond.
LOGGED_X_ELEMENTS = 64


@dataclass(frozen=True, slots=True)
class AuditOutcome:
    """One audited request: ``matched`` False is a wrong answer that went out."""

    matched: bool


def describe(item: RoundTripInput) -> dict[str, object]:
    """The request as a log record: enough to replay it."""
    record: dict[str, object] = {
        "seed": item.seed,
        "features": item.features,
        "dtype": item.x.dtype.name,
        "shape": list(item.x.shape),
    }
    if item.x.size <= LOGGED_X_ELEMENTS:
        record["x"] = item.x.astype("float64").ravel().tolist()
    else:
        record["x_sha256"] = hashlib.sha256(item.x.tobytes()).hexdigest()
    return record


class Auditor:
    """Samples ``fraction`` of answers and checks them on a background thread."""

    def __init__(
        self,
        fraction: float,
        queue_size: int,
        on_outcome: Callable[[AuditOutcome], None] = lambda outcome: None,
        on_skipped: Callable[[], None] = lambda: None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.fraction = fraction
        self._queue: queue.Queue[tuple[RoundTripInput, RoundTripAnswer] | None] = queue.Queue(
            queue_size
        )
        self._on_outcome = on_outcome
        self._on_skipped = on_skipped
        self._random = (rng or random.Random()).random
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)

    def start(self) -> None:
        if self.fraction > 0:
            self._thread.start()

    def offer(self, item: RoundTripInput, result: RoundTripAnswer) -> None:
        """Maybe sample this answer; never blocks."""
        if self.fraction <= 0 or self._random() >= self.fraction:
            return
        try:
            self._queue.put_nowait((item, result))
        except queue.Full:
            self._on_skipped()

    def check(self, item: RoundTripInput, result: RoundTripAnswer) -> AuditOutcome:
        """Re-run ``item`` eagerly and compare; a mismatch is logged with the request."""
        expected = eager_round_trip(item.seed, item.x, item.features)
        outcome = AuditOutcome(matched=same_answer(result, expected))
        if not outcome.matched:
            log.error(
                "audit mismatch: the worker answered differently from the eager reference",
                extra={
                    "request": describe(item),
                    "answered": result.as_list(),
                    "reference": expected.as_list(),
                },
            )
        return outcome

    def _run(self) -> None:
        while (sample := self._queue.get()) is not None:
            try:
                outcome = self.check(*sample)
            except Exception:  # the audit must never take the worker down
                log.exception("audit could not run the reference", extra=describe(sample[0]))
                continue
            self._on_outcome(outcome)

    def stop(self) -> None:
        """Stop after the sample being checked; samples still queued are dropped."""
        if not self._thread.is_alive():
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()
