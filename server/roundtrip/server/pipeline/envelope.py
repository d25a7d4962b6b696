"""The one envelope every call (and every stream message) is answered in (:class:`Envelope`),
and the calls open now, which a drain waits on (:class:`OpenCalls`)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

import grpc

from roundtrip.server.errors import Failure, ShuttingDown, failure_of
from roundtrip.server.ops.metrics import WorkerMetrics
from roundtrip.server.ops.tracing import TraceStart, Tracing


class OpenCalls:
    """The calls handlers hold now, and whether new ones are accepted: what a drain waits on.

    Unary calls and whole streams count one each. Once :meth:`refuse_new` runs,
    new calls are answered UNAVAILABLE (retryable elsewhere) and every open
    stream is asked to finish what it started and end.

    >>> calls = OpenCalls()
    >>> calls.enter(); calls.open, calls.accepting
    (1, True)
    >>> calls.refuse_new(); calls.leave(); calls.open, calls.accepting
    (0, False)
    """

    def __init__(self) -> None:
        self.open = 0
        self.accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._streams: set[Callable[[], None]] = set()

    def enter(self) -> None:
        self.open += 1
        self._idle.clear()

    def leave(self) -> None:
        self.open -= 1
        if not self.open:
            self._idle.set()

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ShuttingDown("the worker is draining; retry on another worker")

    def watch_stream(self, end: Callable[[], None]) -> Callable[[], None]:
        """Register an open stream's ``end``, run on :meth:`refuse_new`; returns the unregister."""
        self._streams.add(end)
        return functools.partial(self._streams.discard, end)

    def refuse_new(self) -> None:
        self.accepting = False
        for end in list(self._streams):
            end()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is open (True), or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Pipeline(Protocol):
    """What an envelope needs of the pipeline
    (:class:`~roundtrip.server.pipeline.pipeline.Pipeline`)."""

    @property
    def calls(self) -> OpenCalls: ...

    @property
    def metrics(self) -> WorkerMetrics: ...

    @property
    def tracing(self) -> Tracing | None: ...


class Envelope:
    """One call (or one stream message) answered: open for the drain while it runs
    (``opens``), counted once by the code it really ended with, its failure mapped by
    :func:`~roundtrip.server.errors.failure_of` and kept in :attr:`failure` (the exception
    is swallowed: the door answers with the failure in its own wire format).

    A cancel (the caller went away, or its deadline passed) is counted as ``dropped()``
    says and propagates. ``counts=False`` is for a call whose requests are counted one by
    one (a batch, a stream): only a failure of the call as a whole is counted.

    With a ``trace`` (and tracing on) the call's span is current while it runs (its
    requests' spans and every log line written meanwhile belong to it) and ends with the
    code the call ended with.
    """

    __slots__ = (
        "_counts",
        "_dropped",
        "_method",
        "_opens",
        "_pipeline",
        "_span",
        "_started",
        "_trace",
        "failure",
    )

    def __init__(
        self,
        pipeline: Pipeline,
        method: str,
        *,
        dropped: Callable[[], grpc.StatusCode],
        counts: bool,
        opens: bool,
        trace: TraceStart | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._method = method
        self._dropped = dropped
        self._counts = counts
        self._opens = opens
        self._started = 0.0
        self._trace = trace if pipeline.tracing is not None else None
        self._span: tuple[Any, object] | None = None
        self.failure: Failure | None = None

    def note(self, key: str, value: int | str) -> None:
        """An attribute of the call's span (nothing while it has none)."""
        if self._span is not None:
            self._span[0].set_attribute(key, value)

    @property
    def traced(self) -> bool:
        """Whether the call has a recorded span (what :meth:`note` writes to)."""
        return self._span is not None

    def __enter__(self) -> Envelope:
        self._started = time.perf_counter()
        if self._trace is not None and self._pipeline.tracing is not None:
            self._span = self._pipeline.tracing.start_call(self._trace)
        if self._opens:
            self._pipeline.calls.enter()
        if self._counts:
            self._pipeline.metrics.inflight.inc()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        metrics = self._pipeline.metrics
        if self._counts:
            metrics.inflight.dec()
        if self._opens:
            self._pipeline.calls.leave()
        seconds = time.perf_counter() - self._started
        if error is None:
            self._end_span("OK")
            if self._counts:
                metrics.observe_rpc(self._method, "OK", seconds)
            return False
        if isinstance(error, asyncio.CancelledError):
            code = self._dropped().name
            self._end_span(code, "the call was cancelled (its caller left, or its deadline)", 499)
            if self._counts:  # a call that counts its requests has counted them as dropped
                metrics.observe_rpc(self._method, code, seconds)
            return False
        if not isinstance(error, Exception):
            self._end_span("UNKNOWN", repr(error))
            return False
        self.failure = failure_of(error)
        self._end_span(self.failure.code.name, self.failure.message, self.failure.http_status)
        metrics.observe_rpc(self._method, self.failure.code.name, seconds)
        return True

    def _end_span(self, code: str, message: str = "", http_status: int = 200) -> None:
        if self._span is not None:
            span, token = self._span
            self._span = None
            if self._trace is not None and "http.route" in self._trace.attributes:
                span.set_attribute("http.response.status_code", http_status)
            Tracing.end_call(span, token, code, message)
