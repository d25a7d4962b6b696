"""The gRPC servicer: wire -> validation -> batcher -> wire. No computation here.

:func:`failure_of` is the one mapping from an error to its status, and
:func:`counted` the one place a request is counted by the code it ended with:
a unary call aborts with the status, a stream message gets it as its own
``StreamError`` so a bad message never ends the stream. :func:`add_to_server` registers the
methods with a parser that turns undecodable bytes into INVALID_ARGUMENT
(grpcio's default answers them with UNKNOWN, and a stream would hang) and
counts every message's bytes against the worker's budget (:class:`Received`).
:class:`OpenCalls` is what a drain refuses new calls with and waits on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import message, message_factory
from google.protobuf.descriptor import ServiceDescriptor

from roundtrip.server import numerics
from roundtrip.server.admission import (
    ByteBudget,
    Reservation,
    WorkingSet,
    answer_bytes,
    working_set_bytes,
)
from roundtrip.server.audit import Auditor
from roundtrip.server.batcher import Batcher, Gathering, Ticket
from roundtrip.server.errors import InvalidArgument, LimitExceeded, RequestError, ShuttingDown
from roundtrip.server.metrics import NUMERICS_LABELS, WorkerMetrics
from roundtrip.server.validation import RequestLimits, decode, weigh
from roundtrip.server.values import RoundTripAnswer, RoundTripInput
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.wire import arrays

log = logging.getLogger(__name__)

ROUNDTRIP_SERVICE = pb.DESCRIPTOR.services_by_name["RoundTripService"]

#: Answers up to this size (no outputs) give their bytes back when the handler returns.
SMALL_ANSWER_BYTES = 64 * 1024

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


@dataclass(frozen=True, slots=True)
class Received:
    """A message as the parser hands it over, with the bytes it holds against the budget.

    The servicer releases ``held`` once it is done with the message: the
    message's bytes were in memory before any admission could refuse it.
    """

    message: Any
    held: Reservation


def tolerant_parser(
    message_type: type[message.Message], budget: ByteBudget
) -> Callable[[bytes], Received]:
    def parse(data: bytes) -> Received:
        held = budget.received(len(data))
        try:
            return Received(message_type.FromString(data), held)
        except message.DecodeError as error:
            return Received(Unparseable(message_type.DESCRIPTOR.full_name, str(error)), held)

    return parse


def add_to_server(
    servicer: Any,
    server: grpc.aio.Server,
    service: ServiceDescriptor = ROUNDTRIP_SERVICE,
) -> None:
    """Register every method of ``service`` (the servicer's methods of the same names) with
    :func:`tolerant_parser`, counting against ``servicer.budget``."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=tolerant_parser(
                message_factory.GetMessageClass(method.input_type), servicer.budget
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


#: A caller's own deadline reaches the worker as a plain cancel, a little before the worker's
#: copy of that deadline (which started when the call arrived): a cancel this close to the
#: deadline is counted as the deadline.
DEADLINE_SLACK_S = 0.25


def dropped_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """Why grpc cancelled a handler: its deadline passed, or the caller (or shutdown) ended it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@dataclass(frozen=True, slots=True)
class Failure:
    """How a request ended when it was not answered: its status code and message."""

    code: grpc.StatusCode
    message: str


def failure_of(error: Exception) -> Failure:
    """The one mapping from an exception to a status, for unary calls and stream messages alike.

    A :class:`RequestError` carries its own code and message; anything else is a bug in the
    worker: INTERNAL for this request alone, logged with its traceback.

    >>> failure_of(InvalidArgument("features must be >= 1 (got 0)")).code.name
    'INVALID_ARGUMENT'
    """
    if isinstance(error, RequestError):
        log.debug("request refused", extra={"code": error.code.name, "error": error.message})
        return Failure(error.code, error.message)
    log.exception("unexpected error", extra={"code": "INTERNAL"})
    return Failure(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")


async def counted(
    metrics: WorkerMetrics,
    method: str,
    dropped: Callable[[], grpc.StatusCode],
    work: Callable[[], Awaitable[Response]],
    *,
    count_ok: bool = True,
) -> Response | Failure:
    """Run one request's ``work``; count it once, by the code it really ended with.

    An error becomes its :class:`Failure` (returned, for the caller to answer with); a
    cancel is counted as ``dropped()`` says (for gRPC, :func:`dropped_code`) and propagates.
    ``count_ok=False`` is for a call whose requests are counted one by one (a batch): only
    a failure of the call as a whole counts (its cancellation is counted on its items).
    """
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    counts = count_ok
    inflight = metrics.inflight if count_ok else None  # a batch counts its items in flight
    if inflight is not None:
        inflight.inc()
    try:
        return await work()
    except asyncio.CancelledError:
        code = dropped()
        counts = count_ok  # a call that counts its items has counted them as dropped
        raise
    except Exception as error:
        failure = failure_of(error)
        code = failure.code
        counts = True
        return failure
    finally:
        if inflight is not None:
            inflight.dec()
        if counts:
            metrics.observe_rpc(method, code.name, time.perf_counter() - started)


class Servicer(Protocol):
    """What the method wrappers need of a servicer: its counters, its open calls, and its
    numerics fingerprint (empty until the self-check has run)."""

    metrics: WorkerMetrics
    calls: OpenCalls

    def fingerprint(self) -> str: ...


def check_new_call(servicer: Servicer, expected_fingerprint: str | None) -> None:
    """What every call asking for work passes first, whichever its door (unary, stream, V2
    gRPC, REST): the worker still takes new calls, and it has the numerics fingerprint the
    call insists on (if any)."""
    servicer.calls.check_accepting()
    numerics.check_fingerprint(expected_fingerprint, servicer.fingerprint())


def rpc_errors(method: UnaryMethod[Received, Response]) -> UnaryMethod[Received, Response]:
    """A unary method answered through :func:`counted`: a failure aborts with its status."""
    return _answered(method, count_ok=True)


def status_errors(method: UnaryMethod[Received, Response]) -> UnaryMethod[Received, Response]:
    """:func:`rpc_errors` for a method about the worker itself (GetServerInfo, V2's
    ServerReady...): still answered while the worker drains, so it can say it is not ready,
    and whatever numerics fingerprint the call insists on (it is how callers learn it)."""
    return _answered(method, count_ok=True, about_the_worker=True)


def batch_errors(method: UnaryMethod[Received, Response]) -> UnaryMethod[Received, Response]:
    """:func:`rpc_errors` for a call that counts its items itself: the call is counted
    only when it fails as a whole."""
    return _answered(method, count_ok=False)


def _answered(
    method: UnaryMethod[Received, Response], *, count_ok: bool, about_the_worker: bool = False
) -> UnaryMethod[Received, Response]:
    @functools.wraps(method)
    async def wrapper(
        self: Servicer, received: Received, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        async def work() -> Response:
            if isinstance(received.message, Unparseable):
                raise received.message.error()
            if not about_the_worker:
                metadata = context.invocation_metadata()
                check_new_call(self, numerics.expected_fingerprint(metadata))
            return await method(self, received, context)

        self.calls.enter()
        try:
            outcome = await counted(
                self.metrics,
                method.__name__,
                functools.partial(dropped_code, context),
                work,
                count_ok=count_ok,
            )
            if isinstance(outcome, Failure):
                await context.abort(outcome.code, outcome.message)
            return outcome
        finally:
            received.held.release()
            self.calls.leave()

    return wrapper


def _release_all(held: Sequence[Reservation], _: object = None) -> None:
    for reservation in held:
        reservation.release()


def encode_result(
    result: RoundTripAnswer, response: pb.RoundTripResponse | None = None
) -> pb.RoundTripResponse:
    """The answer as a ``RoundTripResponse``; written into ``response`` when given (a batch
    outcome's own field, so it is not built apart and copied in)."""
    if response is None:
        response = pb.RoundTripResponse()
    response.orig_sum = result.orig_sum
    response.merged_sum = result.merged_sum
    response.max_abs_diff = result.max_abs_diff
    if result.orig_out is not None and result.merged_out is not None:
        dtype = result.orig_out.dtype
        response.orig_out.CopyFrom(arrays.to_proto(result.orig_out, dtype))
        response.merged_out.CopyFrom(arrays.to_proto(result.merged_out, dtype))
    return response


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RoundTripServicer:
    """Implements ``roundtrip.v1.RoundTripService`` over a :class:`Batcher`.

    Registered from the service descriptor by :func:`add_to_server`, so its methods take
    what :func:`tolerant_parser` hands over (a :class:`Received`), not bare messages.
    """

    def __init__(
        self,
        batcher: Batcher,
        limits: RequestLimits,
        server_info: pb.GetServerInfoResponse,
        metrics: WorkerMetrics,
        auditor: Auditor,
        budget: ByteBudget,
        *,
        max_stream_inflight: int,
        max_batch_items: int,
    ) -> None:
        self.metrics = metrics
        self.budget = budget
        self._auditor = auditor
        self._batcher = batcher
        self.limits = limits
        self._server_info = server_info
        self.max_stream_inflight = max_stream_inflight
        self.max_batch_items = max_batch_items
        self.calls = OpenCalls()

    async def answer(
        self, request: pb.RoundTripRequest, message_bytes: int, deadline: float | None
    ) -> tuple[pb.RoundTripResponse, Reservation]:
        """Weigh, admit by bytes, decode, run and encode one request.

        The caller releases the returned reservation once the answer is written.
        """
        size = weigh(request, self.limits, message_bytes=message_bytes)
        held = self.budget.reserve(working_set_bytes(size))
        try:
            item = decode(request)
            result = await self._batcher.submit(item, deadline=deadline)
            response = encode_result(result)
            self.settle(item, result, held)
            return response, held
        except BaseException:
            held.release()
            raise

    @rpc_errors
    async def RoundTrip(  # noqa: N802 (the generated servicer's name)
        self, received: Received, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RoundTripResponse:
        request: pb.RoundTripRequest = received.message
        response, held = await self.answer(request, received.held.nbytes, deadline_of(context))
        self.release_when_sent(context, (held,))
        return response

    @batch_errors
    async def RoundTripBatch(  # noqa: N802
        self, received: Received, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RoundTripBatchResponse:
        """Answer every request of the message as if each came alone; outcomes in order.

        Each item is weighed, admitted, decoded and queued on its own (so items join the
        per-shape batches with all other traffic, and one bad item gets its own error while
        the others are answered), in one pass: no task or coroutine per item. Items are
        counted one by one, by the code each ended with.
        """
        batch: pb.RoundTripBatchRequest = received.message
        count = len(batch.requests)
        if count > self.max_batch_items:
            raise LimitExceeded(
                f"a RoundTripBatch holds {count} requests, over this worker's limit of "
                f"{self.max_batch_items} (max_batch_items, env ROUNDTRIP_MAX_BATCH_ITEMS)"
            )
        started = time.perf_counter()
        deadline = deadline_of(context)
        outcomes: list[Failure | RoundTripAnswer | None] = [None] * count
        queued: list[tuple[int, RoundTripInput, Reservation, Ticket]] = []
        gathering = Gathering()
        self.metrics.inflight.inc(count)
        try:
            for index, request in enumerate(batch.requests):
                try:
                    enqueued = self._enqueue(request, received.held.nbytes, deadline, gathering)
                    queued.append((index, *enqueued))
                except Exception as error:
                    outcomes[index] = failure_of(error)
            await gathering.wait()
        except asyncio.CancelledError:
            code = dropped_code(context).name
            self.abandon((held, ticket) for _, _, held, ticket in queued)
            self.metrics.observe_rpcs("RoundTripBatch", [code] * count, started)
            raise
        finally:
            self.metrics.inflight.dec(count)
        try:
            return self._batch_response(context, outcomes, queued, started)
        except BaseException:  # a bug past this point must not keep the items' bytes
            for _, _, held, _ in queued:
                held.release()
            raise

    def _batch_response(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        outcomes: list[Failure | RoundTripAnswer | None],
        queued: list[tuple[int, RoundTripInput, Reservation, Ticket]],
        started: float,
    ) -> pb.RoundTripBatchResponse:
        """The outcomes in order; each item counted by its code; answers' bytes held until
        sent."""
        response = pb.RoundTripBatchResponse()
        answered: list[tuple[RoundTripInput, RoundTripAnswer, Reservation]] = []
        for index, item, held, ticket in queued:
            failed = ticket.future.exception()
            if isinstance(failed, Exception):
                outcomes[index] = failure_of(failed)
                held.release()
                continue
            answer: RoundTripAnswer = ticket.future.result()
            outcomes[index] = answer
            answered.append((item, answer, held))
        codes = []
        for outcome in outcomes:
            slot = response.outcomes.add()
            if isinstance(outcome, Failure):
                slot.error.code, slot.error.message = outcome.code.value[0], outcome.message
                codes.append(outcome.code.name)
            elif outcome is not None:
                encode_result(outcome, slot.response)
                codes.append("OK")
        for item, answer, held in answered:
            self.settle(item, answer, held)
        self.metrics.observe_rpcs("RoundTripBatch", codes, started)
        self.release_when_sent(context, [held for _, _, held in answered])
        return response

    def _enqueue(
        self,
        request: pb.RoundTripRequest,
        message_bytes: int,
        deadline: float | None,
        gathering: Gathering,
    ) -> tuple[RoundTripInput, Reservation, Ticket]:
        """Weigh, admit by bytes, decode and queue one request without waiting for it."""
        size = weigh(request, self.limits, message_bytes=message_bytes)
        held = self.budget.reserve(working_set_bytes(size))
        try:
            item = decode(request)
            ticket = self._batcher.enqueue(item, deadline=deadline, gathering=gathering)
            return item, held, ticket
        except BaseException:
            held.release()
            raise

    def admit(
        self,
        item: RoundTripInput,
        size: WorkingSet,
        deadline: float | None,
        gathering: Gathering,
    ) -> tuple[Reservation, Ticket]:
        """Admit by bytes and queue a request decoded elsewhere (V2's tensors), no waiting."""
        held = self.budget.reserve(working_set_bytes(size))
        try:
            return held, self._batcher.enqueue(item, deadline=deadline, gathering=gathering)
        except BaseException:
            held.release()
            raise

    def abandon(self, queued: Iterable[tuple[Reservation, Ticket]]) -> None:
        """The caller of queued requests went away: take them out of the queue, free their
        bytes."""
        for held, ticket in queued:
            self._batcher.forget(ticket)
            held.release()

    def settle(self, item: RoundTripInput, answer: RoundTripAnswer, held: Reservation) -> None:
        """An answered request: offer it to the audit, and keep holding only its answer's
        bytes (until it is sent)."""
        self._auditor.offer(item, answer)
        outputs = answer.orig_out.nbytes if answer.orig_out is not None else 0
        held.shrink(answer_bytes(outputs))

    def release_when_sent(
        self, context: grpc.aio.ServicerContext[Any, Any], held: Sequence[Reservation]
    ) -> None:
        """Give back answers' bytes now when they are small, else once gRPC has sent them."""
        if sum(reservation.nbytes for reservation in held) > SMALL_ANSWER_BYTES:
            callback = functools.partial(_release_all, held)
            context.add_done_callback(callback)  # type: ignore[arg-type]  # (stubs: a class)
        else:  # a few numbers: a callback per call would cost more than the bytes matter
            _release_all(held)

    def fingerprint(self) -> str:
        return self._server_info.numerics.fingerprint

    def set_fingerprint(self, fingerprint: str) -> dict[str, str]:
        """Publish the self-check's fingerprint (GetServerInfo); the identity as a dict."""
        identity = self._server_info.numerics
        identity.fingerprint = fingerprint
        return {name: getattr(identity, name) for name in NUMERICS_LABELS}

    @status_errors
    async def GetServerInfo(  # noqa: N802
        self, received: Received, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServerInfoResponse:
        return self._server_info

    async def RoundTripStream(  # noqa: N802
        self,
        request_iterator: AsyncIterator[Received],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.RoundTripStreamResponse]:
        """Answer each message as soon as it is done, tagged with its id.

        A message holds one of ``max_stream_inflight`` slots from when it is
        read until its answer has been written, so a caller that stops reading
        answers stops the worker reading its requests (HTTP/2 flow control then
        slows the caller) and never piles answers up in the worker. When the
        worker drains, the stream stops reading, sends every answer it owes,
        and ends with UNAVAILABLE: the messages it did not read were never
        accepted and can be sent again to another worker.
        """
        stream = _OpenStream(self, context)
        context.add_done_callback(lambda _: stream.close())  # type: ignore[arg-type]
        self.calls.enter()
        unwatch = self.calls.watch_stream(stream.end_for_drain)
        try:
            check_new_call(self, numerics.expected_fingerprint(context.invocation_metadata()))
            reader = stream.start_reading(request_iterator)
            while (answer := await stream.answers.get()) is not None:
                yield answer.response
                stream.written(answer)  # only now may the stream read another message
            await reader  # re-raise a read error, if any
            if stream.drained:
                raise ShuttingDown(
                    "the worker is draining: every message it read was answered; "
                    "send the unanswered ones again on a new stream (another worker)"
                )
        except Exception as error:  # the stream itself failed (not one of its messages)
            failure = failure_of(error)
            seconds = time.perf_counter() - stream.started
            self.metrics.observe_rpc("RoundTripStream", failure.code.name, seconds)
            await context.abort(failure.code, failure.message)
        finally:
            unwatch()
            stream.close()
            self.calls.leave()


@dataclass(slots=True)
class _Answer:
    response: pb.RoundTripStreamResponse
    held: Reservation | None = None


class _OpenStream:
    """One RoundTripStream call: its reader, its answering tasks, the answers not yet written.

    :meth:`close` runs when the call ends however it ends (also when grpc
    cancels it while an answer waits to be written, which never resumes the
    handler): it stops the tasks and gives back the bytes of unwritten answers.
    """

    def __init__(self, servicer: RoundTripServicer, context: grpc.aio.ServicerContext[Any, Any]):
        self._servicer = servicer
        self._context = context
        self._deadline = deadline_of(context)
        self._slots = asyncio.Semaphore(servicer.max_stream_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._owed: set[Reservation] = set()
        self._reader: asyncio.Task[None] | None = None
        self._reading = True
        self.drained = False
        self.started = time.perf_counter()
        self.answers: asyncio.Queue[_Answer | None] = asyncio.Queue()

    def start_reading(self, request_iterator: AsyncIterator[Received]) -> asyncio.Task[None]:
        self._reader = asyncio.create_task(self._read_all(request_iterator))
        return self._reader

    def written(self, answer: _Answer) -> None:
        if answer.held is not None:
            answer.held.release()
            self._owed.discard(answer.held)
        self._slots.release()

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
        for held in self._owed:
            held.release()
        self._owed.clear()

    async def _read_all(self, request_iterator: AsyncIterator[Received]) -> None:
        try:
            try:
                async for item in request_iterator:
                    if isinstance(item.message, Unparseable):  # no id to answer it by: end
                        item.held.release()
                        raise item.message.error()
                    try:
                        await self._slots.acquire()
                    except BaseException:
                        item.held.release()
                        raise
                    task = asyncio.create_task(self._answer_one(item))
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

    async def _answer_one(self, received: Received) -> None:
        message: pb.RoundTripStreamRequest = received.message
        servicer = self._servicer
        try:
            outcome = await counted(
                servicer.metrics,
                "RoundTripStream",
                functools.partial(dropped_code, self._context),
                functools.partial(
                    servicer.answer, message.request, received.held.nbytes, self._deadline
                ),
            )
        finally:
            received.held.release()
        if isinstance(outcome, Failure):
            self.answers.put_nowait(_Answer(stream_error(message.id, outcome)))
            return
        response, held = outcome
        self._owed.add(held)
        self.answers.put_nowait(
            _Answer(pb.RoundTripStreamResponse(id=message.id, response=response), held)
        )


def stream_error(message_id: int, failure: Failure) -> pb.RoundTripStreamResponse:
    """One stream message's own error: the status a unary call would have ended with."""
    return pb.RoundTripStreamResponse(
        id=message_id, error=pb.StreamError(code=failure.code.value[0], message=failure.message)
    )
