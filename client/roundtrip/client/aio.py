"""The asyncio twin of :class:`~roundtrip.client.sync.RoundTripClient`.

>>> # async with AsyncRoundTripClient("127.0.0.1:50051") as client:
>>> #     result = await client.round_trip(0, [1.0, 2.0, 3.0], 4)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
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
from roundtrip.client.sync import (
    STREAM_RESUME_BACKOFF_S,
    InOrder,
    StreamOutcome,
    Unanswered,
    resumable,
    stream_messages,
    stream_outcome,
)
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc


class AsyncRoundTripClient:
    """Calls a RoundTrip worker from asyncio code; same arguments as the sync client."""

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
            grpc.aio.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options)
        )
        self._stub = pb_grpc.RoundTripServiceStub(self._channel)
        self.timeout = timeout
        self._metadata = call_metadata(metadata, token)

    async def round_trip(
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
            response = await self._stub.RoundTrip(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None
        return parse_response(response)

    async def stream(
        self,
        requests: Iterable[tuple[Any, npt.ArrayLike, Any]],
        *,
        timeout: float | None = None,
        dtype: str = "float32",
        return_outputs: bool = False,
    ) -> AsyncIterator[StreamOutcome]:
        """Like the sync ``stream``: outcomes in request order; refusals are yielded; a stream
        a draining worker ended goes on over a new one."""
        pending = Unanswered(stream_messages(requests, dtype, return_outputs))
        order = InOrder()
        resumes = 0
        while True:
            call = self._stub.RoundTripStream(
                pending.outgoing(),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
            try:
                async for message in call:
                    pending.answered(message.id)
                    for outcome in order.push(message.id, stream_outcome(message)):
                        yield outcome
                return
            except grpc.RpcError as error:
                pending.end_stream()
                if not resumable(error, resumes):
                    raise errors.from_rpc_error(error) from None
                await asyncio.sleep(STREAM_RESUME_BACKOFF_S * 2**resumes)
                resumes += 1

    async def server_info(self, *, timeout: float | None = None) -> pb.GetServerInfoResponse:
        try:
            return await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    async def close(self) -> None:
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
