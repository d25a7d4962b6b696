"""``RoundTripStream``: many requests on one stream, each answered as soon as it is done,
tagged with its id; a bad message gets its own error and the stream goes on.

A message holds one of ``max_stream_inflight`` slots from when it is read until its answer
has been written, so a caller that stops reading answers stops the worker reading its
requests (HTTP/2 flow control then slows the caller) and never piles answers up in the
worker. Each message is a :class:`~roundtrip.server.pipeline.pipeline.Call` of its own, owned by the
stream from the moment it is read: written, its call closes; the stream ending however it
ends (finished, failed, cancelled, its caller gone) closes every call it still owns. When the
worker drains, the stream stops reading, sends every answer it owes, and ends with
UNAVAILABLE: the messages it did not read were never accepted and can be sent again to
another worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from roundtrip.server.codecs.codec import answer_wire_bytes, encode_result, weighed
from roundtrip.server.doors.grpc_calls import (
    Context,
    Received,
    Unparseable,
    deadline_of,
    dropped_code,
    unpacked,
)
from roundtrip.server.errors import Failure, ShuttingDown
from roundtrip.server.numerics import numerics
from roundtrip.server.ops.tracing import TraceStart
from roundtrip.server.pipeline.calls import Call
from roundtrip.server.pipeline.pipeline import Pipeline
from roundtrip.v1 import roundtrip_pb2 as pb

log = logging.getLogger(__name__)

METHOD = "RoundTripStream"
SERVICE = pb.DESCRIPTOR.services_by_name["RoundTripService"].full_name


class StreamDoor:
    """``RoundTripStream`` over ``pipeline``, at most ``max_stream_inflight`` unanswered
    (or unwritten) messages per stream."""

    def __init__(
        self, pipeline: Pipeline, *, max_stream_inflight: int, write_timeout_s: float = 30.0
    ) -> None:
        self.pipeline = pipeline
        self.max_stream_inflight = max_stream_inflight
        self.write_timeout_s = write_timeout_s

    def methods(self) -> dict[str, Callable[..., Any]]:
        """The handlers by method name, for ``grpc_calls.add_to_server``."""
        return {"RoundTripStream": self.RoundTripStream}

    async def RoundTripStream(  # noqa: N802 (the generated servicer's name)
        self, request_iterator: AsyncIterator[Received], context: Context
    ) -> None:
        pipeline = self.pipeline
        stream = _OpenStream(pipeline, context, self.max_stream_inflight)
        # grpc may end the call while an answer waits to be written, and never resume here.
        # Weakly: grpc keeps its callbacks as long as it keeps the call's state, and the
        # stream is not its to keep.
        closes = functools.partial(_close_stream, weakref.ref(stream))
        context.add_done_callback(closes)  # type: ignore[arg-type]
        unwatch = pipeline.calls.watch_stream(stream.end_for_drain)
        dropped = functools.partial(dropped_code, context)
        metadata = context.invocation_metadata()
        trace = None  # the stream's span; each message's is its child
        if pipeline.tracing is not None:
            trace = TraceStart.rpc(SERVICE, METHOD, metadata, 0)
        try:  # the stream as a whole: its messages are counted one by one
            with pipeline.envelope(METHOD, dropped=dropped, counts=False, trace=trace) as envelope:
                pipeline.check_new_call(numerics.expected_fingerprint(metadata))
                reader = stream.start_reading(request_iterator)
                while (answer := await stream.answers.get()) is not None:
                    await stream.write(answer, self.write_timeout_s)
                await reader  # re-raise a read error, if any
                if stream.drained:
                    raise ShuttingDown(
                        "the worker is draining: every message it read was answered; "
                        "send the unanswered ones again on a new stream (another worker)"
                    )
            if envelope.failure is not None:
                await context.abort(envelope.failure.code, envelope.failure.message)
        finally:
            unwatch()
            stream.close()


@dataclass(slots=True)
class _Answer:
    response: pb.RoundTripStreamResponse
    call: Call


class _OpenStream:
    """One RoundTripStream call: its reader, its answering tasks, the calls of its messages
    not yet written. :meth:`close` stops the tasks and closes those calls."""

    def __init__(self, pipeline: Pipeline, context: Context, max_inflight: int) -> None:
        self._pipeline = pipeline
        self._context = context
        self._dropped = functools.partial(dropped_code, context)
        self._deadline = deadline_of(context)
        self._caller = context.peer()
        self._slots = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._owned: set[Call] = set()
        self._reader: asyncio.Task[None] | None = None
        self._reading = True
        self.drained = False
        self.answers: asyncio.Queue[_Answer | None] = asyncio.Queue()

    def start_reading(self, request_iterator: AsyncIterator[Received]) -> asyncio.Task[None]:
        self._reader = asyncio.create_task(self._read_all(request_iterator))
        return self._reader

    async def write(self, answer: _Answer, timeout_s: float) -> None:
        """Write ``answer``; once written, its call gives back its bytes and its place (only
        now may the stream read another message). An answer its caller does not take within
        ``timeout_s`` ends the stream: gRPC still holds that answer (its call closes when
        gRPC ends the call: the caller's deadline, its connection closing or reaching
        ``max_connection_age_s``), and everything else the stream holds is given back now.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self._context.write(answer.response)
        except TimeoutError:
            self._owned.discard(answer.call)
            self._context.add_done_callback(lambda _: answer.call.close())  # type: ignore[arg-type]
            self._pipeline.metrics.unread_answers.labels(METHOD).inc()
            log.warning(
                "answer not taken",
                extra={"method": METHOD, "caller": self._caller, "write_timeout_s": timeout_s},
            )
            # Ends the handler without a status (which gRPC would queue behind the answer the
            # caller does not take); the stream's calls close in its finally.
            raise asyncio.CancelledError from None
        answer.call.close()
        self._owned.discard(answer.call)

    def end_for_drain(self) -> None:
        """Stop reading; the answers owed are still sent, then the stream ends UNAVAILABLE."""
        self.drained = True
        if self._reading and self._reader is not None:
            self._reader.cancel()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for task in list(self._tasks):
            task.cancel()
        for call in self._owned:
            call.close()
        self._owned.clear()
        # A cancelled task keeps its CancelledError, whose traceback holds the task's
        # frames (a message, its call): let go of the tasks, or stream and tasks would
        # refer to each other until a collector pass (tests/test_pipeline.py).
        self._reader = None
        self._tasks = set()
        # Answers written by nobody now (their calls closed above): let go of them too, and
        # leave the end mark for a handler still waiting on the queue.
        while not self.answers.empty():
            self.answers.get_nowait()
        self.answers.put_nowait(None)

    async def _read_all(self, request_iterator: AsyncIterator[Received]) -> None:
        try:
            try:
                async for received in request_iterator:
                    call = self._pipeline.call(
                        deadline=self._deadline,
                        caller=self._caller,
                        message=received.held,
                        message_size=received.size,
                    )
                    self._owned.add(call)  # the stream's from here: closed with it
                    message = await unpacked(received.message)
                    if isinstance(message, Unparseable) and message.id is None:
                        raise message.error  # no id to answer it by: the stream ends
                    await self._slots.acquire()
                    call.occupy(self._slots)
                    task = asyncio.create_task(self._answer_one(call, message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except asyncio.CancelledError:
                if not self.drained:
                    raise
            self._reading = False
            while self._tasks:
                await asyncio.gather(*self._tasks)
        finally:
            self.answers.put_nowait(None)

    async def _answer_one(
        self, call: Call, message: pb.RoundTripStreamRequest | Unparseable
    ) -> None:
        """Answer one message, or its own refusal (one refused before its parse: the byte
        budget could not take it, or it is over a limit) by its id; the stream goes on."""
        pipeline = self._pipeline
        message_id = message.id or 0  # an Unparseable is only answered when it has one
        trace = None
        if pipeline.tracing is not None:
            trace = TraceStart.message(SERVICE, METHOD, message_id, call.message_bytes)
        with pipeline.envelope(METHOD, dropped=self._dropped, opens=False, trace=trace) as envelope:
            if isinstance(message, Unparseable):
                raise message.error
            call.claim()
            size, decode = weighed(
                message.request, pipeline.limits, message_bytes=call.message_bytes
            )
            pipeline.check_answer_size(answer_wire_bytes(size))
            answer = await call.answer(size, decode)
        if envelope.failure is not None:
            self.answers.put_nowait(_Answer(stream_error(message_id, envelope.failure), call))
            return
        response = pb.RoundTripStreamResponse(id=message_id, response=encode_result(answer))
        self.answers.put_nowait(_Answer(response, call))


def _close_stream(stream: weakref.ref[_OpenStream], _context: object) -> None:
    if (alive := stream()) is not None:
        alive.close()


def stream_error(message_id: int, failure: Failure) -> pb.RoundTripStreamResponse:
    """One stream message's own error: the status a unary call would have ended with."""
    return pb.RoundTripStreamResponse(
        id=message_id, error=pb.StreamError(code=failure.code.value[0], message=failure.message)
    )
