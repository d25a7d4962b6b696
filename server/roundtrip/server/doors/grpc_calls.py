"""What the gRPC doors share: their methods registered with a parser that counts every
message's bytes and answers undecodable bytes with INVALID_ARGUMENT, and a unary call
answered in the pipeline's envelope.

grpcio's own parser answers bytes that are not a valid message with UNKNOWN, and a stream
would hang; :func:`tolerant_parser` hands the handler an :class:`Unparseable` instead, and
counts the message against the byte budget the moment gRPC hands it over (or drops it
unparsed when the budget cannot take it). A large message is checked on the wire
(:mod:`~roundtrip.server.pipeline.wire_counts`) and parsed on the parse thread, not on the event
loop (:class:`Deferred`): the handler awaits it. :func:`unary` wraps a handler so that it
gets the :class:`Call` holding that message, answers in :meth:`Pipeline.envelope`, aborts
with the failure's status, and gives the call's bytes back once the answer is sent.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import Descriptor, ServiceDescriptor

from roundtrip.server.errors import Failure, InvalidArgument, LimitExceeded, RequestError
from roundtrip.server.numerics import numerics
from roundtrip.server.ops.tracing import TraceStart, Tracing
from roundtrip.server.pipeline.admission import Reservation
from roundtrip.server.pipeline.calls import Call
from roundtrip.server.pipeline.wire_counts import (
    WALKED_ABOVE,
    RepeatedLimits,
    check_counts,
    varint_field,
)

Context = grpc.aio.ServicerContext[Any, Any]
Response = TypeVar("Response")

#: Calls holding up to this many bytes (their answers: a few numbers, no outputs) give them
#: back when the handler returns; larger ones once gRPC has sent the answer. A callback on
#: every call would cost more than the bytes matter.
SMALL_ANSWER_BYTES = 64 * 1024

#: A caller's own deadline reaches the worker as a plain cancel, a little before the worker's
#: copy of that deadline (which started when the call arrived): a cancel this close to the
#: deadline is counted as the deadline.
DEADLINE_SLACK_S = 0.25


class Answering(Protocol):
    """A call being answered (:class:`~roundtrip.server.pipeline.pipeline.Envelope`): its
    failure, once it has failed."""

    @property
    def failure(self) -> Failure | None: ...


class Traced(Answering, Protocol):
    """A call being answered whose span (when it has one) takes attributes."""

    @property
    def traced(self) -> bool: ...

    def note(self, key: str, value: int | str) -> None: ...


class Pipeline(Protocol):
    """What a gRPC method needs of the pipeline
    (:class:`~roundtrip.server.pipeline.pipeline.Pipeline`): a message's bytes held as it
    arrives and its repeated fields bounded, a call opened, checked, and answered in its
    envelope."""

    @property
    def repeated_limits(self) -> RepeatedLimits: ...

    @property
    def tracing(self) -> Tracing | None: ...

    def received(self, nbytes: int) -> Reservation: ...

    def call(
        self,
        *,
        deadline: float | None,
        caller: str,
        message: Reservation | None = None,
        message_size: int = 0,
    ) -> Call: ...

    def check_new_call(
        self, expected_fingerprint: str | None, call: Call | None = None
    ) -> None: ...

    def envelope(
        self,
        method: str,
        *,
        dropped: Callable[[], grpc.StatusCode],
        counts: bool = True,
        trace: TraceStart | None = None,
    ) -> AbstractContextManager[Traced]: ...


@dataclass(frozen=True, slots=True)
class Unparseable:
    """What the parser hands the handler for bytes it would not parse: not a valid message,
    one whose repeated fields hold more than the worker's limits (counted on the wire), or
    one the byte budget could not take. ``id``: the message's own ``id`` field read from
    the wire, when its type has one (a stream message: it is answered by it).

    It keeps the refusal's kind and text, not the exception: gRPC keeps what its parser
    returned for as long as the call lives, and an exception once raised keeps its frames
    (the parser's held the message's bytes), which only a collector pass would free.
    """

    kind: type[RequestError]
    detail: str
    id: int | None = None

    @classmethod
    def of(cls, error: RequestError, message_id: int | None = None) -> Unparseable:
        return cls(type(error), error.message, message_id)

    @property
    def error(self) -> RequestError:
        """The refusal, as a new exception each time it is asked for."""
        return self.kind(self.detail)


class Deferred:
    """A message larger than :data:`~roundtrip.server.pipeline.wire_counts.WALKED_ABOVE`: its bytes,
    checked and parsed on ``executor`` (the parse thread) when its handler asks, so that the
    walk over its fields and the parse never hold the event loop. The bytes are let go of
    once parsed (gRPC keeps what its parser returned for the whole call)."""

    __slots__ = ("data", "executor", "parse")

    def __init__(self, data: bytes, parse: Callable[[bytes], Any], executor: Executor) -> None:
        self.data = data
        self.parse = parse
        self.executor = executor

    async def parsed(self) -> Any:
        """The message, or an :class:`Unparseable`."""
        data, self.data = self.data, b""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.parse, data)


async def opened(message: Any) -> Any:
    """A received message as its handler reads it: parsed (a :class:`Deferred` on the parse
    thread), or an :class:`Unparseable`'s error raised."""
    message = await unpacked(message)
    if isinstance(message, Unparseable):
        raise message.error
    return message


async def unpacked(message: Any) -> Any:
    """A received message parsed (a :class:`Deferred` on the parse thread): the message, or
    an :class:`Unparseable`."""
    if isinstance(message, Deferred):
        return await message.parsed()
    return message


@dataclass(frozen=True, slots=True)
class Received:
    """A message as the parser hands it over, with the bytes it holds against the budget
    (handed on to the :class:`Call` that answers it)."""

    message: Any
    held: Reservation | None
    #: The message's size on the wire.
    size: int = 0


def tolerant_parser(
    message_type: type[message.Message], pipeline: Pipeline, executor: Executor | None = None
) -> Callable[[bytes], Received]:
    descriptor: Descriptor = message_type.DESCRIPTOR  # type: ignore[assignment]
    id_field = descriptor.fields_by_name.get("id")
    id_number = id_field.number if id_field is not None and id_field.message_type is None else 0

    def unparseable(error: RequestError, data: bytes) -> Unparseable:
        return Unparseable.of(error, varint_field(data, id_number) if id_number else None)

    def parse_now(data: bytes) -> Any:
        try:
            check_counts(data, descriptor, pipeline.repeated_limits)
            return message_type.FromString(data)
        except message.DecodeError as error:
            invalid = InvalidArgument(
                f"request is not a valid {descriptor.full_name} message: {error}"
            )
            return unparseable(invalid, data)
        except LimitExceeded as error:
            return unparseable(error, data)

    def parse(data: bytes) -> Received:
        try:
            held = pipeline.received(len(data))
        except RequestError as error:  # the budget cannot take it: dropped unparsed
            return Received(unparseable(error, data), None, len(data))
        if executor is not None and len(data) > WALKED_ABOVE:
            return Received(Deferred(data, parse_now, executor), held, len(data))
        return Received(parse_now(data), held, len(data))

    return parse


def add_to_server(
    methods: Mapping[str, Callable[..., Any]],
    service: ServiceDescriptor,
    server: grpc.aio.Server,
    pipeline: Pipeline,
    executor: Executor | None = None,
) -> None:
    """Register ``methods`` (by their names in ``service``) with :func:`tolerant_parser`,
    large messages parsed on ``executor``."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: kinds[method.client_streaming, method.server_streaming](
            methods[method.name],
            request_deserializer=tolerant_parser(
                message_factory.GetMessageClass(method.input_type), pipeline, executor
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


def deadline_of(context: Context) -> float | None:
    """The call's deadline as a ``time.monotonic()`` time (None: none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def dropped_code(context: Context) -> grpc.StatusCode:
    """Why grpc cancelled a handler: its deadline passed, or the caller (or shutdown) ended it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def close_when_sent(call: Call, context: Context) -> None:
    """Give back what ``call`` holds now when it is small, else once gRPC has sent the
    answer (however the call ends: the callback runs on cancel too)."""
    if call.answer_bytes > SMALL_ANSWER_BYTES:
        context.add_done_callback(lambda _: call.close())  # type: ignore[arg-type]
    else:
        call.close()


class Door(Protocol):
    @property
    def pipeline(self) -> Pipeline: ...

    #: The gRPC service the door's methods belong to (its spans' names).
    service: str


Handler = Callable[[Any, Call, Any, Context], Awaitable[Response]]


def unary(
    *, about_the_worker: bool = False, counts: bool = True
) -> Callable[[Handler[Response]], Callable[[Any, Received, Context], Awaitable[Response]]]:
    """A unary method of a door, answered in the pipeline's envelope: ``handler(door, call,
    message, context)`` gets the :class:`Call` that holds the message.

    ``about_the_worker``: a method about the worker itself (GetServerInfo, V2's
    ServerReady...), still answered while the worker drains and whatever numerics
    fingerprint the call insists on (it is how callers learn it). ``counts=False``: the
    handler counts the call's requests itself (a batch).
    """

    def decorate(
        handler: Handler[Response],
    ) -> Callable[[Any, Received, Context], Awaitable[Response]]:
        method = handler.__name__

        @functools.wraps(handler)
        async def answered(door: Door, received: Received, context: Context) -> Response:
            pipeline = door.pipeline
            call = pipeline.call(
                deadline=deadline_of(context),
                caller=context.peer(),
                message=received.held,
                message_size=received.size,
            )
            try:
                dropped = functools.partial(dropped_code, context)
                metadata = None if about_the_worker else context.invocation_metadata()
                trace = None  # calls about the worker (probes among them) make no spans
                if metadata is not None and pipeline.tracing is not None:
                    trace = TraceStart.rpc(door.service, method, metadata, received.size)
                with pipeline.envelope(
                    method, dropped=dropped, counts=counts, trace=trace
                ) as envelope:
                    if metadata is not None:
                        pipeline.check_new_call(numerics.expected_fingerprint(metadata), call)
                    response = await handler(door, call, await opened(received.message), context)
                    if envelope.traced:
                        envelope.note("rpc.response.size", response.ByteSize())  # type: ignore[attr-defined]
            except BaseException:
                call.close()
                raise
            failure = envelope.failure
            if failure is None:
                close_when_sent(call, context)
                return response
            call.close()
            # grpc keeps the exception abort raises in a reference cycle with the frames it
            # passed through, this one included, which only a collector pass frees: let go
            # of the message first, or every refused message (up to max_message_bytes
            # each) stays in memory until then (test_pipeline.py)
            del received, call
            await context.abort(failure.code, failure.message)

        return answered

    return decorate
