"""The blocking client.

>>> # with RoundTripClient("127.0.0.1:50051") as client:
>>> #     result = client.round_trip(0, [1.0, 2.0, 3.0], 4)
>>> #     result.as_list()  # [-4.221933364868164, -4.221933364868164, 0.0]
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import grpc
import numpy.typing as npt

from roundtrip.client import errors
from roundtrip.client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT_S,
    call_metadata,
    channel_options,
)
from roundtrip.client.messages import RoundTripResult, build_request, parse_response
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

StreamOutcome = RoundTripResult | errors.RoundTripError
"""What :meth:`RoundTripClient.stream` yields per request: its result, or its error."""


def stream_messages(
    requests: Iterable[tuple[Any, npt.ArrayLike, Any]], dtype: str, return_outputs: bool
) -> Iterator[pb.RoundTripStreamRequest]:
    """Number ``(seed, x, features)`` tuples 0, 1, 2, ... as stream messages."""
    for index, (seed, x, features) in enumerate(requests):
        yield pb.RoundTripStreamRequest(
            id=index,
            request=build_request(seed, x, features, dtype=dtype, return_outputs=return_outputs),
        )


def stream_outcome(message: pb.RoundTripStreamResponse) -> StreamOutcome:
    if message.HasField("error"):
        return errors.from_rpc_code(message.error.code, message.error.message)
    return parse_response(message.response)


class InOrder:
    """Puts out-of-order ``(id, outcome)`` pairs back into id order 0, 1, 2, ..."""

    def __init__(self) -> None:
        self._waiting: dict[int, StreamOutcome] = {}
        self._next = itertools.count()
        self._expected = next(self._next)

    def push(self, index: int, outcome: StreamOutcome) -> list[StreamOutcome]:
        """Record one answer; return those now ready, in order."""
        self._waiting[index] = outcome
        ready = []
        while self._expected in self._waiting:
            ready.append(self._waiting.pop(self._expected))
            self._expected = next(self._next)
        return ready


class Unanswered:
    """The stream's messages sent and not yet answered, so a stream that a draining worker
    ended (UNAVAILABLE, after answering everything it read) goes on, on a new stream.

    :meth:`outgoing` is one stream's request iterator: first the messages a
    previous stream left unanswered, in id order, then new ones. Pulling from
    the caller's iterator happens under a lock and stops once that stream is
    over, so no message is pulled by an ended stream and lost.

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
        self._source = messages
        self._sent: dict[int, pb.RoundTripStreamRequest] = {}
        self._lock = threading.Lock()
        self._stream = 0

    def outgoing(self) -> Iterator[pb.RoundTripStreamRequest]:
        stream = self._stream
        with self._lock:
            again = [self._sent[key] for key in sorted(self._sent)]
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
            self._sent.pop(message_id, None)

    def end_stream(self) -> None:
        """The current stream is over: its iterator pulls nothing more."""
        with self._lock:
            self._stream += 1


#: How often one ``stream`` call reopens its stream after a worker drained it, and the
#: first pause before it does (doubled each time, as the unary retry policy's backoff).
STREAM_RESUMES = 3
STREAM_RESUME_BACKOFF_S = 0.05


def resumable(error: grpc.RpcError, resumes: int) -> bool:
    """Whether a stream that ended with ``error`` may go on, on a new stream."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and resumes < STREAM_RESUMES


class RoundTripClient:
    """Calls a RoundTrip worker. Use as a context manager, or call :meth:`close`.

    ``target`` is any gRPC target: ``host:port``, or ``dns:///name:port`` to
    spread calls over every address the name resolves to. ``timeout`` is the
    default deadline of each call, in seconds. ``credentials`` turns TLS on
    (:func:`~roundtrip.client.channel.tls_credentials` builds them from PEM
    files); ``token`` is sent as ``authorization: Bearer <token>`` on every call.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        metadata: tuple[tuple[str, str], ...] = (),
        token: str | None = None,
    ) -> None:
        options = channel_options(max_message_bytes)
        self._channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(target, options)
        )
        self._stub = pb_grpc.RoundTripServiceStub(self._channel)
        self.timeout = timeout
        self._metadata = call_metadata(metadata, token)

    def round_trip(
        self,
        seed: Any,
        x: npt.ArrayLike,
        features: Any,
        *,
        timeout: float | None = None,
        dtype: str = "float32",
        return_outputs: bool = False,
    ) -> RoundTripResult:
        """Run RoundTrip once. Raises a :class:`~roundtrip.client.errors.RoundTripError`."""
        request = build_request(seed, x, features, dtype=dtype, return_outputs=return_outputs)
        try:
            response = self._stub.RoundTrip(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None
        return parse_response(response)

    def stream(
        self,
        requests: Iterable[tuple[Any, npt.ArrayLike, Any]],
        *,
        timeout: float | None = None,
        dtype: str = "float32",
        return_outputs: bool = False,
    ) -> Iterator[StreamOutcome]:
        """Send many ``(seed, x, features)`` over one stream; yield outcomes in request order.

        A request the worker refuses yields its :class:`RoundTripError` (not
        raised) and the stream goes on; an error of the stream itself is raised.
        When a draining worker ends the stream (UNAVAILABLE) the unanswered
        requests go on over a new stream, to another worker, up to
        :data:`STREAM_RESUMES` times; ``timeout`` applies to each stream.
        """
        pending = Unanswered(stream_messages(requests, dtype, return_outputs))
        order = InOrder()
        resumes = 0
        while True:
            calls = self._stub.RoundTripStream(
                pending.outgoing(),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
            try:
                for message in calls:
                    pending.answered(message.id)
                    yield from order.push(message.id, stream_outcome(message))
                return
            except grpc.RpcError as error:
                pending.end_stream()
                if not resumable(error, resumes):
                    raise errors.from_rpc_error(error) from None
                time.sleep(STREAM_RESUME_BACKOFF_S * 2**resumes)
                resumes += 1

    def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """The worker's versions, backend, devices and limits."""
        try:
            return self._stub.GetServerInfo(
                pb.GetServerInfoRequest(),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RoundTripClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
