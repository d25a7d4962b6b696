"""Request errors as values that carry their gRPC status code.

Validation and the batcher raise these; the servicer maps them to a status
in one place (``service.failure_of``), so every method answers the same way.
"""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request this worker will not answer, with the status a caller should see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RequestError):
    """The request is malformed or the reference itself rejects it; do not retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(RequestError):
    """The request is well-formed but larger than this worker's configured limits."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(RequestError):
    """The request names something this worker does not serve (a V2 model or version)."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(RequestError):
    """The worker is overloaded: its queue is at ``max_queue_size``; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(RequestError):
    """The worker's byte budget (``max_inflight_bytes``) cannot take this request now."""

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


class ComputeFailed(RequestError):
    """JAX failed on this request alone; the worker keeps serving."""

    code = grpc.StatusCode.INTERNAL


class ComputeOutOfMemory(ComputeFailed):
    """JAX could not allocate memory for this request."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
