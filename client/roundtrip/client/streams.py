"""What both clients need to run ``RoundTripStream``: numbering, ordering, and resuming.

A stream's messages are numbered 0, 1, 2, ... (:func:`stream_messages`); answers may come
back out of order and :class:`InOrder` puts them back. When a draining worker ends the
stream (UNAVAILABLE, after answering every message it read), :class:`Unanswered` (threads,
for the blocking client) or :class:`AsyncUnanswered` (asyncio) sends the unanswered ones
again on a new stream, which the channel places on another worker.

>>> order = InOrder()
>>> order.push(1, "b"), order.push(0, "a")
([], ['a', 'b'])
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Generic, TypeVar

import grpc
import numpy.typing as npt

from roundtrip.client.messages import Integer, Outcome, build_request
from roundtrip.v1 import roundtrip_pb2 as pb

StreamOutcome = Outcome
"""What ``stream`` yields per request: its result, or its error (yielded, not raised)."""

StreamRequest = tuple[Integer, npt.ArrayLike, Integer]
"""One stream request: ``(seed, x, features)``, the arguments of ``round_trip``."""

#: How often one ``stream`` call reopens its stream after a worker drained it, and the
#: first pause before it does (doubled each time, as the unary retry policy's backoff).
STREAM_RESUMES = 3
STREAM_RESUME_BACKOFF_S = 0.05

T = TypeVar("T")


def stream_message(
    index: int, request: StreamRequest, dtype: str, return_outputs: bool
) -> pb.RoundTripStreamRequest:
    """Request ``index`` of a stream as its message (``ValueError`` for a bad seed or x)."""
    seed, x, features = request
    return pb.RoundTripStreamRequest(
        id=index,
        request=build_request(seed, x, features, dtype=dtype, return_outputs=return_outputs),
    )


def stream_messages(
    requests: Iterable[StreamRequest], dtype: str, return_outputs: bool
) -> Iterator[pb.RoundTripStreamRequest]:
    """Number ``(seed, x, features)`` tuples 0, 1, 2, ... as stream messages."""
    for index, request in enumerate(requests):
        yield stream_message(index, request, dtype, return_outputs)


async def async_stream_messages(
    requests: AsyncIterable[StreamRequest] | Iterable[StreamRequest],
    dtype: str,
    return_outputs: bool,
) -> AsyncIterator[pb.RoundTripStreamRequest]:
    """:func:`stream_messages` over an async iterable (or a plain one)."""
    if not isinstance(requests, AsyncIterable):
        for message in stream_messages(requests, dtype, return_outputs):
            yield message
        return
    index = 0
    async for request in requests:
        yield stream_message(index, request, dtype, return_outputs)
        index += 1


class InOrder(Generic[T]):
    """Puts out-of-order ``(id, outcome)`` pairs back into id order 0, 1, 2, ..."""

    def __init__(self) -> None:
        self._waiting: dict[int, T] = {}
        self._next = itertools.count()
        self._expected = next(self._next)

    def push(self, index: int, outcome: T) -> list[T]:
        """Record one answer; return those now ready, in order."""
        self._waiting[index] = outcome
        ready = []
        while self._expected in self._waiting:
            ready.append(self._waiting.pop(self._expected))
            self._expected = next(self._next)
        return ready


#: The status grpc.aio gives a stream when a message it writes meets the end the server just
#: sent (``_write`` catches core's failed send and calls ``set_internal_error``): the
#: server's own status, UNAVAILABLE from a draining worker, is lost, and the stream is
#: over either way. Seen once in two clean-clone CI runs of the async rollout test.
AIO_WRITE_AFTER_END = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def resumable(error: grpc.RpcError, resumes: int) -> bool:
    """Whether a stream that ended with ``error`` may go on, on a new stream: the worker
    ended it (UNAVAILABLE: draining), or grpc.aio lost that status to a write racing it."""
    if resumes >= STREAM_RESUMES:
        return False
    code = error.code()
    return code == grpc.StatusCode.UNAVAILABLE or (code, error.details()) == AIO_WRITE_AFTER_END


class _Sent:
    """Messages sent and not yet answered, and which stream may still pull new ones."""

    def __init__(self) -> None:
        self._sent: dict[int, pb.RoundTripStreamRequest] = {}
        self._stream = 0

    def again(self) -> list[pb.RoundTripStreamRequest]:
        return [self._sent[key] for key in sorted(self._sent)]

    def answered(self, message_id: int) -> None:
        self._sent.pop(message_id, None)

    def end_stream(self) -> None:
        """The current stream is over: its iterator pulls nothing more."""
        self._stream += 1


class Unanswered(_Sent):
    """The blocking client's record of a stream's unanswered messages.

    :meth:`outgoing` is one stream's request iterator (grpc pulls it on its own
    thread): first the messages a previous stream left unanswered, in id order,
    then new ones. Pulling from the caller's iterator happens under a lock and
    stops once that stream is over, so no message is pulled by an ended stream
    and lost.

    >>> messages = iter([pb.RoundTripStreamRequest(id=i) for i in range(3)])
    >>> pending = Unanswered(messages)
    >>> first = pending.outgoing()
    >>> [m.id for m in (next(first), next(first))]
    [0, 1]
    >>> pending.answered(0); pending.end_stream()
    >>> [m.id for m in pending.outgoing()]
    [1, 2]
    """

    def __init__(self, messages: Iterator[pb.RoundTripStreamRequest]) -> None:
        super().__init__()
        self._source = messages
        self._lock = threading.Lock()

    def outgoing(self) -> Iterator[pb.RoundTripStreamRequest]:
        stream = self._stream
        with self._lock:
            again = self.again()
        yield from again
        while True:
            with self._lock:
                if stream != self._stream:
                    return
                message = next(self._source, None)
                if message is None:
                    return
                self._sent[message.id] = message
            yield message

    def answered(self, message_id: int) -> None:
        with self._lock:
            super().answered(message_id)

    def end_stream(self) -> None:
        with self._lock:
            super().end_stream()


class AsyncUnanswered(_Sent):
    """:class:`Unanswered` for the asyncio client, over an async iterator of messages.

    Everything runs on one event loop, so no lock is needed. The caller's iterator is
    pulled by a task of its own: when a stream ends while waiting for the caller's next
    request, that pull is not cancelled (which would end the caller's generator) but
    handed to the next stream.
    """

    def __init__(self, messages: AsyncIterator[pb.RoundTripStreamRequest]) -> None:
        super().__init__()
        self._source = messages
        self._pulling: asyncio.Future[pb.RoundTripStreamRequest | None] | None = None
        self._held: pb.RoundTripStreamRequest | None = None

    async def _pull(self) -> pb.RoundTripStreamRequest | None:
        return await anext(self._source, None)

    async def outgoing(self) -> AsyncIterator[pb.RoundTripStreamRequest]:
        stream = self._stream
        for resent in self.again():
            yield resent
        while stream == self._stream:
            message: pb.RoundTripStreamRequest | None = self._held
            self._held = None
            if message is None:
                if self._pulling is None:
                    self._pulling = asyncio.ensure_future(self._pull())
                message = await asyncio.shield(self._pulling)
                self._pulling = None
                if message is None:
                    return
                if stream != self._stream:  # this stream ended while we waited: the next sends it
                    self._held = message
                    return
            self._sent[message.id] = message
            yield message

    def close(self) -> None:
        """Stop a pull still waiting on the caller's iterator (the call is over)."""
        if self._pulling is not None:
            self._pulling.cancel()
