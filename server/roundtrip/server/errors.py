"""Request errors as values that carry their gRPC status code, and the one mapping from
any error to the status a caller gets (:func:`failure_of`), over gRPC or HTTP
(:data:`HTTP_STATUS`).

Validation, admission, the pipeline and the batcher raise these; every door (RoundTrip,
the stream, RoundTripBatch, V2 over gRPC and REST) turns an error into its status through
:func:`failure_of` alone, so every way in answers the same way. The codes say what the
caller can do: a request that can never succeed here (malformed, or over a hard limit) is
INVALID_ARGUMENT (HTTP 400, or 413 for a body); RESOURCE_EXHAUSTED (429) is kept for what
waiting cures (the queue, the byte budget, the device's memory).

>>> failure_of(InvalidArgument("features must be >= 1 (got 0)")).code.name
'INVALID_ARGUMENT'
>>> [failure_of(error).http_status for error in (QueueFull("full"), BodyTooLarge("big"))]
[429, 413]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request this worker will not answer, with the status a caller should see (and, over
    HTTP, the HTTP status when it is not the one :data:`HTTP_STATUS` gives the code)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RequestError):
    """The request is malformed or the reference itself rejects it; do not retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(RequestError):
    """The request is well-formed but over one of this worker's hard limits: it can never
    succeed here, however long the caller waits, so the code is not a retryable one."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BodyTooLarge(LimitExceeded):
    """An HTTP body (or its JSON) over this worker's limit: refused before it is read
    (HTTP 413)."""

    http_status = 413


class CallerGone(RequestError):
    """The caller hung up before its call was answered (its upload cut short)."""

    code = grpc.StatusCode.CANCELLED
    http_status = 499


class UploadTimedOut(RequestError):
    """An HTTP upload that stopped sending before its body was complete (HTTP 408)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408


class NotFound(RequestError):
    """The request names something this worker does not serve (a V2 model or version)."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(RequestError):
    """The worker is overloaded: its queue is at ``max_queue_size``; waiting cures it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(RequestError):
    """The worker's byte budget (``max_inflight_bytes``) cannot take this request now;
    waiting cures it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDown(RequestError):
    """The worker is draining and takes no new work; retry on another worker."""

    code = grpc.StatusCode.UNAVAILABLE


class NotReady(RequestError):
    """The worker cannot answer this call until its warm-up is done; retry (elsewhere)."""

    code = grpc.StatusCode.UNAVAILABLE


class NumericsMismatch(RequestError):
    """The call insists on a numerics fingerprint this worker does not have."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExpired(RequestError):
    """The caller's deadline passed before the request reached the engine."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AnswerNotTaken(RequestError):
    """The caller did not take its answer within ``write_timeout_s``; its connection or
    stream was ended."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ComputeFailed(RequestError):
    """JAX failed on this request alone; the worker keeps serving."""

    code = grpc.StatusCode.INTERNAL


class ComputeOutOfMemory(ComputeFailed):
    """JAX could not allocate memory for this request."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True, slots=True)
class Failure:
    """How a request ended when it was not answered: its status code and message, and the
    HTTP status a REST caller gets.

    >>> Failure(grpc.StatusCode.NOT_FOUND, "unknown model").http_status
    404
    """

    code: grpc.StatusCode
    message: str
    http_status: int = 0

    def __post_init__(self) -> None:
        if not self.http_status:
            object.__setattr__(self, "http_status", HTTP_STATUS[self.code])


def failure_of(error: Exception) -> Failure:
    """The one mapping from an exception to a status, for every door alike.

    A :class:`RequestError` carries its own code and message; anything else is a bug in the
    worker: INTERNAL for this request alone, logged with its traceback.
    """
    if isinstance(error, RequestError):
        log.debug("request refused", extra={"code": error.code.name, "error": error.message})
        return Failure(error.code, error.message, error.http_status or 0)
    log.exception("unexpected error", extra={"code": "INTERNAL"})
    return Failure(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")


#: gRPC status -> HTTP status, as Google's APIs map them (google/rpc/code.proto).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
