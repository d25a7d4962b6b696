"""The gRPC servicer: wire -> validation -> batcher -> wire. No computation here.

``rpc_errors`` maps :class:`RequestError` to its status for every unary
method; the stream turns the same errors into per-message ``StreamError``s so a
bad message never ends the stream. :func:`add_to_server` registers the
methods with a parser that turns undecodable bytes into INVALID_ARGUMENT
(grpcio's default answers them with UNKNOWN, and a stream would hang).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import message, message_factory

from roundtrip.client import arrays
from roundtrip.client.messages import RoundTripResult
from roundtrip.server.audit import Auditor
from roundtrip.server.batcher import Batcher
from roundtrip.server.errors import InvalidArgument, RequestError
from roundtrip.server.metrics import WorkerMetrics
from roundtrip.server.validation import RequestLimits, validate
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
UnaryMethod = Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Unparseable:
    """What the parser hands the servicer for bytes that are not a valid message."""

    type_name: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"request is not a valid {self.type_name} message: {self.reason}")


def tolerant_parser(message_type: type[message.Message]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except message.DecodeError as error:
            return Unparseable(message_type.DESCRIPTOR.full_name, str(error))

    return parse


def add_to_server(servicer: RoundTripServicer, server: grpc.aio.Server) -> None:
    """Register every method of the service descriptor with :func:`tolerant_parser`."""
    service = pb.DESCRIPTOR.services_by_name["RoundTripService"]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(
                message_factory.GetMessageClass(method.input_type)
            ),
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    # as the generated add_*_to_server does: the faster lookup (missing from grpc-stubs)
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]


def rpc_errors(method: UnaryMethod[Request, Response]) -> UnaryMethod[Request, Response]:
    """Answer a :class:`RequestError` with its status; anything else is INTERNAL and logged.

    Also the one place that counts every unary request by status code and times it.
    """

    @functools.wraps(method)
    async def wrapper(
        self: RoundTripServicer, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        self.metrics.inflight.inc()
        try:
            if isinstance(request, Unparseable):
                raise request.error()
            return await method(self, request, context)
        except RequestError as error:
            code = error.code
            log.debug("request refused", extra={"code": code.name, "error": error.message})
            await context.abort(error.code, error.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:  # a bug: keep serving, tell the caller and the operator
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error", extra={"code": "INTERNAL"})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")
        finally:
            self.metrics.inflight.dec()
            self.metrics.observe_rpc(method.__name__, code.name, time.perf_counter() - started)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def encode_result(result: RoundTripResult) -> pb.RoundTripResponse:
    response = pb.RoundTripResponse(
        orig_sum=result.orig_sum,
        merged_sum=result.merged_sum,
        max_abs_diff=result.max_abs_diff,
    )
    if result.orig_out is not None and result.merged_out is not None:
        dtype = result.orig_out.dtype
        response.orig_out.CopyFrom(arrays.to_proto(result.orig_out, dtype))
        response.merged_out.CopyFrom(arrays.to_proto(result.merged_out, dtype))
    return response


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RoundTripServicer(pb_grpc.RoundTripServiceServicer):
    """Implements ``roundtrip.v1.RoundTripService`` over a :class:`Batcher`."""

    def __init__(
        self,
        batcher: Batcher,
        limits: RequestLimits,
        server_info: pb.GetServerInfoResponse,
        metrics: WorkerMetrics,
        auditor: Auditor,
        *,
        max_stream_inflight: int,
    ) -> None:
        self.metrics = metrics
        self._auditor = auditor
        self._batcher = batcher
        self._limits = limits
        self._server_info = server_info
        self._max_stream_inflight = max_stream_inflight

    async def _answer(
        self, request: pb.RoundTripRequest, deadline: float | None
    ) -> pb.RoundTripResponse:
        item = validate(request, self._limits)
        result = await self._batcher.submit(item, deadline=deadline)
        self._auditor.offer(item, result)
        return encode_result(result)

    @rpc_errors
    async def RoundTrip(  # noqa: N802 (the generated servicer's name)
        self, request: pb.RoundTripRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RoundTripResponse:
        return await self._answer(request, _deadline(context))

    @rpc_errors
    async def GetServerInfo(  # noqa: N802
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServerInfoResponse:
        return self._server_info

    async def RoundTripStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.RoundTripStreamRequest | Unparseable],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.RoundTripStreamResponse]:
        """Answer each message as soon as it is done, tagged with its id.

        At most ``max_stream_inflight`` messages are unanswered at once; past
        that the worker stops reading, and HTTP/2 flow control slows the caller.
        """
        deadline = _deadline(context)
        stream_started = time.perf_counter()
        answers: asyncio.Queue[pb.RoundTripStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._max_stream_inflight)
        tasks: set[asyncio.Task[None]] = set()

        async def answer_one(message: pb.RoundTripStreamRequest) -> None:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            self.metrics.inflight.inc()
            try:
                response = await self._answer(message.request, deadline)
                answers.put_nowait(pb.RoundTripStreamResponse(id=message.id, response=response))
            except RequestError as error:
                code = error.code
                answers.put_nowait(
                    pb.RoundTripStreamResponse(
                        id=message.id,
                        error=pb.StreamError(code=error.code.value[0], message=error.message),
                    )
                )
            except Exception as error:
                code = grpc.StatusCode.INTERNAL
                log.exception("unexpected error in stream", extra={"code": "INTERNAL"})
                answers.put_nowait(
                    pb.RoundTripStreamResponse(
                        id=message.id,
                        error=pb.StreamError(
                            code=grpc.StatusCode.INTERNAL.value[0],
                            message=f"internal error: {error!r}",
                        ),
                    )
                )
            finally:
                slots.release()
                self.metrics.inflight.dec()
                self.metrics.observe_rpc(
                    "RoundTripStream", code.name, time.perf_counter() - started
                )

        async def read_all() -> None:
            try:
                async for item in request_iterator:
                    if isinstance(item, Unparseable):  # no id to answer it by: end the stream
                        raise item.error()
                    await slots.acquire()
                    task = asyncio.create_task(answer_one(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*tasks)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader  # re-raise a read error, if any
        except RequestError as error:
            seconds = time.perf_counter() - stream_started
            self.metrics.observe_rpc("RoundTripStream", error.code.name, seconds)
            await context.abort(error.code, error.message)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
