"""The asyncio twin of :class:`~roundtrip.client.sync.RoundTripClient`: same arguments, same
errors, ``await``-ed; ``stream`` also takes an async iterable of requests.

>>> async def call() -> list[float]:
...     async with AsyncRoundTripClient(worker_target) as client:
...         result = await client.round_trip(0, [1.0, 2.0, 3.0], 4)
...         return result.as_list()
>>> asyncio.run(call())
[-4.221933364868164, -4.221933364868164, 0.0]
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
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
    AsyncUnanswered,
    InOrder,
    StreamOutcome,
    StreamRequest,
    async_stream_messages,
    resumable,
)
from roundtrip.client.tracing import call_span
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["RoundTripService"].full_name


class AsyncRoundTripClient:
    """Calls a RoundTrip worker from asyncio code. Use with ``async with``, or ``await``
    :meth:`close`. Arguments as for :class:`~roundtrip.client.sync.RoundTripClient`;
    ``channel`` is a ``grpc.aio.Channel``.
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
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if channel is not None and (credentials is not None or channel_options):
            raise ValueError("pass credentials and channel_options to the channel you build")
        self._owns_channel = channel is None
        if channel is None:
            options = build_channel_options(max_message_bytes, channel_options, retry_policy)
            channel = (
                grpc.aio.secure_channel(target, credentials, options)
                if credentials is not None
                else grpc.aio.insecure_channel(target, options)
            )
        self._channel = channel
        self._stub = pb_grpc.RoundTripServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self.timeout = timeout
        self._metadata = call_metadata(metadata, token, expect_fingerprint)

    async def _unary(self, method: str, request: Any, timeout: Timeout, metadata: Metadata) -> Any:
        """One unary call of ``method`` (its name) with the client's deadline and metadata
        (plus the call's own, and the caller's trace: :mod:`~roundtrip.client.tracing`); a
        failure is raised as its :class:`~roundtrip.client.errors.RoundTripError`."""
        try:
            with call_span(f"{SERVICE}/{method}") as traced:  # the caller's trace, if any
                return await getattr(self._stub, method)(
                    request,
                    timeout=call_timeout(self.timeout, timeout),
                    metadata=(*self._metadata, *metadata, *traced),
                )
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    async def round_trip(
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
        """Run RoundTrip once; arguments, result and errors as the blocking
        :meth:`~roundtrip.client.sync.RoundTripClient.round_trip`.

        Raises:
            ValueError: seed or features not an int64, or x or dtype unusable.
            RoundTripError: the call failed; its subclass names the status
                (``InvalidArgumentError``, ``ResourceExhaustedError``, ...).
        """
        request = build_request(seed, x, features, dtype=dtype, return_outputs=return_outputs)
        response = await self._unary("RoundTrip", request, timeout, metadata)
        return parse_response(response)

    async def round_trip_many(
        self,
        requests: Iterable[StreamRequest],
        *,
        timeout: Timeout = None,
        metadata: Metadata = (),
        dtype: str = "float32",
        return_outputs: bool = False,
    ) -> list[Outcome]:
        """Run many ``(seed, x, features)`` in one ``RoundTripBatch`` call; outcomes in order,
        refusals returned (not raised), as the blocking client's ``round_trip_many``.

        Raises:
            ValueError: a request's seed, features, x or dtype is unusable.
            RoundTripError: the call itself failed (its subclass names the status).
        """
        batch = build_batch(requests, dtype=dtype, return_outputs=return_outputs)
        response = await self._unary("RoundTripBatch", batch, timeout, metadata)
        return [parse_outcome(outcome) for outcome in response.outcomes]

    async def stream(
        self,
        requests: AsyncIterable[StreamRequest] | Iterable[StreamRequest],
        *,
        timeout: Timeout = None,
        metadata: Metadata = (),
        dtype: str = "float32",
        return_outputs: bool = False,
    ) -> AsyncIterator[StreamOutcome]:
        """Send many ``(seed, x, features)`` (an iterable or an async iterable) over one
        stream; yield outcomes in request order, as the blocking client's ``stream`` does:
        refusals are yielded, and a stream a draining worker ended goes on over a new one.

        Raises:
            RoundTripError: the stream itself failed (its subclass names the status).
            ValueError: a request's seed, features, x or dtype is unusable.
        """
        pending = AsyncUnanswered(async_stream_messages(requests, dtype, return_outputs))
        order: InOrder[StreamOutcome] = InOrder()
        resumes = 0
        try:
            while True:
                try:
                    with call_span(f"{SERVICE}/RoundTripStream") as traced:  # the caller's trace
                        call = self._stub.RoundTripStream(
                            pending.outgoing(),
                            timeout=call_timeout(self.timeout, timeout),
                            metadata=(*self._metadata, *metadata, *traced),
                        )
                        async for message in call:
                            pending.answered(message.id)
                            for outcome in order.push(message.id, parse_outcome(message)):
                                yield outcome
                    return
                except grpc.RpcError as error:
                    pending.end_stream()
                    if not resumable(error, resumes):
                        raise errors.from_rpc_error(error) from None
                    await asyncio.sleep(STREAM_RESUME_BACKOFF_S * 2**resumes)
                    resumes += 1
        finally:
            pending.close()

    async def server_info(
        self, *, timeout: Timeout = None, metadata: Metadata = ()
    ) -> pb.GetServerInfoResponse:
        """The worker's versions, backend, devices and limits.

        Raises:
            RoundTripError: the call failed (its subclass names the status).
        """
        request = pb.GetServerInfoRequest()
        response: pb.GetServerInfoResponse = await self._unary(
            "GetServerInfo", request, timeout, metadata
        )
        return response

    async def is_serving(self, *, timeout: Timeout = None) -> bool:
        """Whether a worker behind the target reads SERVING on ``grpc.health.v1``
        (False while it warms up, drains, or cannot be reached).

        Raises:
            RoundTripError: the worker refused the health check itself.
        """
        return await self._check_serving(call_timeout(self.timeout, timeout), wait=False)

    async def wait_until_serving(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Wait until a worker behind the target reads SERVING, for at most ``timeout`` s.

        Raises:
            DeadlineExceededError: not SERVING within ``timeout``.
            RoundTripError: the worker refused the health check itself.
        """
        deadline = time.monotonic() + timeout
        for attempt in itertools.count():
            remaining = deadline - time.monotonic()
            if remaining > 0 and await self._check_serving(remaining, wait=True):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(ready_pause(attempt), remaining))
        raise errors.DeadlineExceededError(f"no worker was SERVING within {timeout} s")

    async def _check_serving(self, timeout: float | None, *, wait: bool) -> bool:
        try:
            response = await self._health.Check(
                HEALTH_CHECK, timeout=timeout, metadata=self._metadata, wait_for_ready=wait
            )
        except grpc.RpcError as error:
            if error.code() in NOT_REACHED:
                return False
            raise errors.from_rpc_error(error) from None
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        """Close the channel (not one passed in as ``channel=``)."""
        if self._owns_channel:
            await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncRoundTripClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
