"""The protocol-neutral pipeline under every door: a call admitted by bytes, its requests
queued into the shared per-shape batches, answered, and what it held given back however
it ends.

The doors (``doors/``: RoundTrip and RoundTripBatch, RoundTripStream, V2 over gRPC, V2
over REST) only turn their wire format into pipeline inputs and the pipeline's outcomes
back into their wire format. What they share is here:

* :class:`Pipeline`: the worker's byte budget, batcher, limits, audit, counters, open
  calls (:class:`OpenCalls`, what a drain refuses and waits on) and numerics fingerprint;
* :class:`Envelope`: the one envelope every call (and every stream message) is answered
  in: open for the drain while it runs, counted once by the code it really ended with,
  and its failure mapped by :func:`~roundtrip.server.errors.failure_of`;
* :class:`~roundtrip.server.pipeline.calls.Call` (:mod:`~roundtrip.server.pipeline.calls`):
  one call's claim on the worker, charged to its caller (a connection), given back however
  the call ends.

>>> from roundtrip.server.pipeline.validation import RequestLimits
>>> limits = RequestLimits(max_x_elements=8, max_features=8, max_param_bytes=1024,
...                        max_output_elements=64)
>>> pipeline = Pipeline(batcher=None, budget=ByteBudget(100), limits=limits, auditor=None,
...                     metrics=None, max_batch_items=1)
>>> with pipeline.call(deadline=None, message=pipeline.received(10), caller="a") as call:
...     with call.holding(60):  # decoding a body, say (the message: 2 x 10)
...         print(pipeline.budget.in_use)
80
>>> pipeline.budget.in_use  # the call closed: everything it held is back
0
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc

from roundtrip.server.engine.audit import Auditor
from roundtrip.server.errors import LimitExceeded, RequestError
from roundtrip.server.numerics import numerics
from roundtrip.server.ops.metrics import WorkerMetrics
from roundtrip.server.ops.tracing import TraceStart, Tracing
from roundtrip.server.pipeline.admission import ByteBudget, Caller, Reservation, WorkingSet
from roundtrip.server.pipeline.batcher import Batcher
from roundtrip.server.pipeline.calls import Call, Holdings
from roundtrip.server.pipeline.envelope import Envelope, OpenCalls
from roundtrip.server.pipeline.many import Many
from roundtrip.server.pipeline.turns import QueueTurns
from roundtrip.server.pipeline.validation import MAX_RANK, RequestLimits
from roundtrip.server.pipeline.wire_counts import RepeatedLimits
from roundtrip.server.values import RoundTripAnswer, RoundTripInput


def repeated_limits(limits: RequestLimits, max_batch_items: int) -> RepeatedLimits:
    """The repeated fields of every door's messages and the knobs that bound them: a batch's
    requests and V2's seed and features elements by ``max_batch_items``, shapes by
    ``max_x_rank`` (V2's by its own rank limit, checked after the parse with its message);
    and the most fields a message may hold: 64 a request of a full batch, plus 65,536 (a
    request's x sent as unpacked floats, which no protobuf library does)."""
    items = (max_batch_items, "max_batch_items, env ROUNDTRIP_MAX_BATCH_ITEMS")
    rank = (limits.max_x_rank, "max_x_rank, env ROUNDTRIP_MAX_X_RANK")
    contents = "inference.InferTensorContents."
    return RepeatedLimits(
        {
            "roundtrip.v1.RoundTripBatchRequest.requests": items,
            "roundtrip.v1.Array.shape": rank,
            "inference.ModelInferRequest.InferInputTensor.shape": (MAX_RANK, "numpy's rank limit"),
            **{contents + kind: items for kind in ("int64_contents", "int_contents")},
        },
        max_fields=64 * max_batch_items + 65536,
    )


class Pipeline:
    """What every door admits its calls into, and answers them from."""

    def __init__(
        self,
        *,
        batcher: Batcher[Any],
        budget: ByteBudget,
        limits: RequestLimits,
        auditor: Auditor,
        metrics: WorkerMetrics,
        max_batch_items: int,
        max_answer_bytes: int = 1 << 62,
        queue_share: float = 1.0,
        bulk_queue_share: float = 1.0,
        tracing: Tracing | None = None,
    ) -> None:
        self.batcher = batcher
        #: Traces (:mod:`~roundtrip.server.ops.tracing`); None: off, and nothing of them runs.
        self.tracing = tracing
        self.budget = budget
        self.limits = limits
        self.auditor = auditor
        self.metrics = metrics
        self.max_batch_items = max_batch_items
        self.max_answer_bytes = max_answer_bytes
        #: What a message's repeated fields may hold, checked on the wire before parsing.
        self.repeated_limits = repeated_limits(limits, max_batch_items)
        queue_size = batcher.max_queue_size if batcher else 1
        #: Places in the queue for calls of many: one caller's share, and the bulk line.
        self.turns = QueueTurns(
            queued=(lambda: batcher.queued) if batcher else (lambda: 0),
            line=max(1, int(queue_size * bulk_queue_share)),
            per_caller=max(1, int(queue_size * queue_share)),
        )
        if batcher is not None:
            batcher.on_taken = self.turns.grant
            batcher.tracing = tracing
        self._holdings = Holdings(budget, batcher, auditor, self.turns, tracing)
        #: The callers with open calls, by key (a connection's peer address).
        self.callers: dict[str, Caller] = {}
        self.calls = OpenCalls()
        #: The numerics fingerprint, set once the self-check has run (empty before).
        self.fingerprint = ""

    def check_new_call(self, expected_fingerprint: str | None, call: Call | None = None) -> None:
        """What every call asking for work passes first, whichever its door: the worker still
        takes new calls, it has the numerics fingerprint the call insists on (if any), and
        the ``call``'s message fits its caller's share of the budget (:meth:`Call.claim`; a
        stream's messages claim theirs as they come)."""
        self.calls.check_accepting()
        numerics.check_fingerprint(expected_fingerprint, self.fingerprint)
        if call is not None:
            call.claim()

    def check_answer_size(self, nbytes: int) -> None:
        """Refuse, before any compute, a call whose answer would be ``nbytes``: over
        ``max_message_bytes`` it could never be sent (gRPC refuses to send it, and a REST
        answer is held to the same limit)."""
        if nbytes > self.max_answer_bytes:
            raise LimitExceeded(
                f"the answer would be {nbytes} bytes, over this worker's limit of "
                f"{self.max_answer_bytes} (max_message_bytes, env ROUNDTRIP_MAX_MESSAGE_BYTES): "
                "ask for fewer rows, fewer features, or no outputs (return_outputs, orig_out, "
                "merged_out)"
            )

    async def answer_all(self, call: Call, requests: AllOrNothing) -> list[RoundTripAnswer]:
        """A call whose ``requests`` succeed or fail whole (:func:`answer_all`), its
        answer refused before any compute when it could never be sent and reserved beside
        the answers' own copies."""
        answer_bytes = requests.answer_wire_bytes()
        self.check_answer_size(answer_bytes)
        call.reserve(answer_bytes)
        return await answer_all(self.many(call, all_or_nothing=True), requests)

    def many(self, call: Call, *, all_or_nothing: bool = False) -> Many:
        """``call`` as a call of many requests (:class:`Many`, closed with the call);
        ``all_or_nothing``: it fails whole at its first failure (V2), so its outcomes are
        ready as soon as one fails."""
        holdings = self._holdings
        many = Many(
            call,
            budget=holdings.budget,
            batcher=holdings.batcher,
            turns=holdings.turns,
            all_or_nothing=all_or_nothing,
        )
        call.attach(many)
        return many

    def received(self, nbytes: int) -> Reservation:
        """Count a message that has arrived, or raise Overloaded when the budget cannot take
        it (the message is then dropped unparsed); the :class:`Call` it is handed to owns the
        reservation from then on."""
        return self.budget.received(nbytes)

    def call(
        self,
        *,
        deadline: float | None,
        caller: str,
        message: Reservation | None = None,
        message_size: int = 0,
    ) -> Call:
        """A new call of ``caller`` (a connection's peer address) whose requests must be
        answered by ``deadline`` (``time.monotonic()``; None: none), holding its
        ``message``'s reservation from now on (charged to the caller by :meth:`Call.claim`);
        ``message_size``: that message's size on the wire."""
        found = self.callers.get(caller)
        if found is None:
            found = self.callers[caller] = Caller(caller)
        return Call(self._holdings, found, deadline, message, self._forget_caller, message_size)

    def _forget_caller(self, caller: Caller) -> None:
        if not caller.calls and self.callers.get(caller.key) is caller:
            del self.callers[caller.key]

    def envelope(
        self,
        method: str,
        *,
        dropped: Callable[[], grpc.StatusCode],
        counts: bool = True,
        opens: bool = True,
        trace: TraceStart | None = None,
    ) -> Envelope:
        """The envelope a call of ``method`` is answered in (:class:`Envelope`), its span
        started as ``trace`` says while tracing is on."""
        return Envelope(self, method, dropped=dropped, counts=counts, opens=opens, trace=trace)


class AllOrNothing(Protocol):
    """The requests of one call that succeeds or fails whole, as its codec unpacked them
    (:class:`~roundtrip.server.codecs.v2.Unpacked`: a V2 call of B seeds)."""

    @property
    def sizes(self) -> Sequence[WorkingSet]:
        """Each request's working set, weighed on its declared shape."""
        ...

    def item(self, index: int) -> RoundTripInput:
        """The ``index``-th request, decoded (once admitted)."""
        ...

    def about(self, index: int, error: RequestError) -> RequestError:
        """``error`` naming the ``index``-th request."""
        ...

    def answer_wire_bytes(self) -> int:
        """An upper bound of the call's answer on the wire."""
        ...


async def answer_all(many: Many, requests: AllOrNothing) -> list[RoundTripAnswer]:
    """Every request of a call that succeeds or fails whole (a V2 call of B seeds): each
    weighed, admitted and read as a call of many's (:meth:`Call.admit_many`). The first
    failure is raised naming its request (``requests.about``) as soon as it happens; closing
    the call then takes the others out of the queue, so a retry does not find the first
    attempt's requests still queued."""
    many.admit(
        [
            (size, functools.partial(requests.item, index))
            for index, size in enumerate(requests.sizes)
        ]
    )
    answers = []
    for index, outcome in enumerate(await many.outcomes()):
        if isinstance(outcome, RequestError):
            raise requests.about(index, outcome)
        if isinstance(outcome, Exception):
            raise outcome  # a bug: INTERNAL
        if outcome is None:
            raise RuntimeError("a request of the call was never answered")  # a bug
        answers.append(outcome)
    return answers
