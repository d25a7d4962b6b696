"""The blocking client.

>>> with RoundTripClient(worker_target) as client:
...     client.round_trip(0, [1.0, 2.0, 3.0], 4).as_list()
[-4.221933364868164, -4.221933364868164, 0.0]

(``worker_target`` is the address of a running worker; the test suite starts one.)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from roundtrip.client import errors
from roundtrip.client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    HEALTH_CHECK,
    NOT_REACHED,
    RETRY_POLICY,
    Metadata,
    Timeout,
    call_metadata,
    call_timeout,
    ready_pause,
)
from roundtrip.client.channel import channel_options as build_channel_options
from roundtrip.client.messages import (
    Integer,
    Outcome,
    RoundTripResult,
    build_batch,
    build_request,
    parse_outcome,
    parse_response,
)
from roundtrip.client.streams import (
    STREAM_RESUME_BACKOFF_S,
    InOrder,
    StreamOutcome,
    StreamRequest,
    Unanswered,
    resumable,
    stream_messages,
)
from roundtrip.client.tracing import call_span
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["RoundTripService"].full_name


class RoundTripClient:
    """Calls a RoundTrip worker. Use as a context manager, or call :meth:`close`.

    Args:
        target: any gRPC target: ``host:port``, or ``dns:///name:port`` to spread calls
            over every address the name resolves to (``round_robin``, skipping workers
            whose health reads NOT_SERVING).
        timeout: the default deadline of each call, in seconds (``None``: no default
            deadline). A call's own ``timeout=`` overrides it; ``NO_DEADLINE`` drops it.
        credentials: TLS for the channel
            (:func:`~roundtrip.client.channel.tls_credentials` builds them from PEM files).
        max_message_bytes: the largest message sent or received.
        metadata: sent on every call (a call's own ``metadata=`` is added to it).
        token: sent as ``authorization: Bearer <token>`` on every call.
        expect_fingerprint: a numerics fingerprint (``server_info().numerics.fingerprint``)
            every call insists on: a worker with another one refuses the call with
            FAILED_PRECONDITION (:class:`FailedPreconditionError`) instead of answering with
            bits that may differ. ``None``: no check.
        channel_options: extra ``grpc.*`` channel options, applied after (and so replacing)
            the client's own: service config, retries, keepalive, message limits.
        retry_policy: the gRPC ``retryPolicy`` of the unary calls
            (:data:`~roundtrip.client.channel.RETRY_POLICY` by default: UNAVAILABLE, 4
            attempts, backoff from 50 ms); ``None``: no retries (where a service mesh
            retries). Load balancing and health checking stay as they are; replacing the
            whole service config through ``channel_options`` would drop them.
        channel: a channel you built yourself (with interceptors, say); then ``target``,
            ``credentials``, ``max_message_bytes`` and ``channel_options`` are not used, and
            :meth:`close` leaves the channel open: it is yours.

    Raises ``ValueError`` when ``channel`` is given together with ``credentials`` or
    ``channel_options``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        metadata: Metadata = (),
        token: str | None = None,
        expect_fingerprint: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        retry_policy: Mapping[str, Any] | None = RETRY_POLICY,
        channel: grpc.Channel | None = None,
    ) -> None:
        if channel is not None and (credentials is not None or channel_options):
            raise ValueError("pass credentials and channel_options to the channel you build")
        self._owns_channel = channel is None
        if channel is None:
            options = build_channel_options(max_message_bytes, channel_options, retry_policy)
            channel = (
                grpc.secure_channel(target, credentials, options)
                if credentials is not None
                else grpc.insecure_channel(target, options)
            )
        self._channel = channel
        self._stub = pb_grpc.RoundTripServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self.timeout = timeout
        self._metadata = call_metadata(metadata, token, expect_fingerprint)

    def _unary(self, method: str, request: Any, timeout: Timeout, metadata: Metadata) -> Any:
        """One unary call of ``method`` (its name) with the client's deadline and metadata
        (plus the call's own, and the caller's trace: :mod:`~roundtrip.client.tracing`); a
        failure is raised as its :class:`~roundtrip.client.errors.RoundTripError`."""
        try:
            with call_span(f"{SERVICE}/{method}") as traced:  # the caller's trace, if any
                return getattr(self._stub, method)(
                    request,
                    timeout=call_timeout(self.timeout, timeout),
                    metadata=(*self._metadata, *metadata, *traced),
                )
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    def round_trip(
        self,
        seed: Integer,
        x: npt.ArrayLike,
        features: Integer,
        *,
        timeout: Timeout = None,
        metadata: Metadata = (),
        dtype: str = "float32",
        return_outputs: bool = False,
    ) -> RoundTripResult:
        """Run RoundTrip once: build ``nnx.Linear(x.shape[-1], features)`` from ``seed``, run
        it on ``x``, split and merge it, run it again, and compare.

        Args:
            seed: any int64 (with JAX's 64-bit mode off only its low 32 bits matter).
            x: anything ``numpy.asarray`` reads as numbers, rank >= 1; the last axis is the
                input width. Sent as raw little-endian ``dtype`` bytes.
            features: the output width, >= 1.
            timeout: seconds; ``None`` for the client's default; ``NO_DEADLINE`` for none.
            metadata: extra metadata for this call (a request id, say).
            dtype: ``float32``, ``float64``, ``float16`` or ``bfloat16``.
            return_outputs: also return ``orig_out`` and ``merged_out``.

        Raises:
            ValueError: seed or features not an int64, or x or dtype unusable; nothing is
                sent.
            InvalidArgumentError: the worker rejected the request, or it is over one of the
                worker's limits (the message names the field, or the limit and its knob).
            ResourceExhaustedError: the worker is overloaded now (its queue or its byte
                budget is full); retry with backoff. Or the message is larger than the
                worker's ``max_message_bytes`` (gRPC core refuses it: never retry as is).
            UnavailableError: no serving worker could be reached (already retried).
            DeadlineExceededError: the deadline passed first.
            RoundTripError: any other status, with its ``code``.
        """
        request = build_request(seed, x, features, dtype=dtype, return_outputs=return_outputs)
        response = self._unary("RoundTrip", request, timeout, metadata)
        return parse_response(response)

    def round_trip_many(
        self,
        requests: Iterable[StreamRequest],
        *,
        timeout: Timeout = None,
        metadata: Metadata = (),
        dtype: str = "float32",
        return_outputs: bool = False,
    ) -> list[Outcome]:
        """Run many ``(seed, x, features)`` in one ``RoundTripBatch`` call; outcomes in order.

        Each request is answered exactly as ``round_trip`` would answer it alone; one the
        worker refuses comes back as its :class:`~roundtrip.client.errors.RoundTripError`
        (not raised) and the others are answered. The worker takes at most
        ``max_batch_items`` (:meth:`server_info`) per call.

        Raises:
            ValueError: a request's seed, features, x or dtype is unusable (its index is
                named); nothing is sent.
            RoundTripError: the call itself failed: more than ``max_batch_items``
                (``InvalidArgumentError``), a message over ``max_message_bytes``
                (``ResourceExhaustedError``, from gRPC core), no serving worker
                (``UnavailableError``), the deadline (``DeadlineExceededError``).
        """
        batch = build_batch(requests, dtype=dtype, return_outputs=return_outputs)
        response = self._unary("RoundTripBatch", batch, timeout, metadata)
        return [parse_outcome(outcome) for outcome in response.outcomes]

    def stream(
        self,
        requests: Iterable[StreamRequest],
        *,
        timeout: Timeout = None,
        metadata: Metadata = (),
        dtype: str = "float32",
        return_outputs: bool = False,
    ) -> Iterator[StreamOutcome]:
        """Send many ``(seed, x, features)`` over one stream; yield outcomes in request order.

        ``requests`` is read lazily, as the worker takes them. A request the worker refuses
        yields its :class:`~roundtrip.client.errors.RoundTripError` (not raised) and the
        stream goes on. When a draining worker ends the stream (UNAVAILABLE) the unanswered
        requests go on over a new stream, to another worker, up to
        :data:`~roundtrip.client.streams.STREAM_RESUMES` times; ``timeout`` applies to each
        stream.

        Raises:
            RoundTripError: the stream itself failed (its subclass names the status).
            ValueError: a request's seed, features, x or dtype is unusable.
        """
        pending = Unanswered(stream_messages(requests, dtype, return_outputs))
        order: InOrder[StreamOutcome] = InOrder()
        resumes = 0
        while True:
            try:
                with call_span(f"{SERVICE}/RoundTripStream") as traced:  # the caller's trace
                    calls = self._stub.RoundTripStream(
                        pending.outgoing(),
                        timeout=call_timeout(self.timeout, timeout),
                        metadata=(*self._metadata, *metadata, *traced),
                    )
                    for message in calls:
                        pending.answered(message.id)
                        yield from order.push(message.id, parse_outcome(message))
                return
            except grpc.RpcError as error:
                pending.end_stream()
                if not resumable(error, resumes):
                    raise errors.from_rpc_error(error) from None
                time.sleep(STREAM_RESUME_BACKOFF_S * 2**resumes)
                resumes += 1

    def server_info(
        self, *, timeout: Timeout = None, metadata: Metadata = ()
    ) -> pb.GetServerInfoResponse:
        """The worker's versions, backend, devices and limits.

        Raises:
            RoundTripError: the call failed (its subclass names the status).
        """
        request = pb.GetServerInfoRequest()
        response: pb.GetServerInfoResponse = self._unary(
            "GetServerInfo", request, timeout, metadata
        )
        return response

    def is_serving(self, *, timeout: Timeout = None) -> bool:
        """Whether a worker behind the target reads SERVING on ``grpc.health.v1``.

        False while it warms up, drains, or cannot be reached.

        Raises:
            RoundTripError: the worker refused the health check itself (a token is needed
                when health is not exempt, say).
        """
        return self._check_serving(call_timeout(self.timeout, timeout), wait=False)

    def wait_until_serving(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Block until a worker behind the target reads SERVING, for at most ``timeout`` s.

        Raises:
            DeadlineExceededError: not SERVING within ``timeout``.
            RoundTripError: the worker refused the health check itself.
        """
        deadline = time.monotonic() + timeout
        for attempt in itertools.count():
            remaining = deadline - time.monotonic()
            if remaining > 0 and self._check_serving(remaining, wait=True):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(ready_pause(attempt), remaining))
        raise errors.DeadlineExceededError(f"no worker was SERVING within {timeout} s")

    def _check_serving(self, timeout: float | None, *, wait: bool) -> bool:
        try:
            response = self._health.Check(
                HEALTH_CHECK,
                timeout=timeout,
                metadata=self._metadata,
                wait_for_ready=wait,
            )
        except grpc.RpcError as error:
            if error.code() in NOT_REACHED:
                return False
            raise errors.from_rpc_error(error) from None
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        """Close the channel (not one passed in as ``channel=``)."""
        if self._owns_channel:
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
