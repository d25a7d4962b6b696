"""Exceptions the client raises for gRPC errors, each keeping its status code.

>>> try:
...     raise from_rpc_code(3, "features must be >= 1 (got 0)")
... except InvalidArgumentError as error:
...     error.code.name
'INVALID_ARGUMENT'
"""

from __future__ import annotations

import grpc


class RoundTripError(Exception):
    """Any error answered by (or on the way to) the worker; ``code`` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(RoundTripError):
    """The request is malformed or its inputs are rejected by the computation. Do not retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(RoundTripError):
    """Over a worker limit (size) or the worker is overloaded (queue full); see the message."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(RoundTripError):
    """No worker could take the call (down, draining, unreachable); retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(RoundTripError):
    """The call's deadline passed before the answer arrived."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(RoundTripError):
    """The worker wants credentials this call did not carry."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPreconditionError(RoundTripError):
    """The worker's numerics fingerprint is not the one the call insisted on: its answer's
    bits could differ; send it to a worker with that fingerprint."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InternalError(RoundTripError):
    """The worker failed on this request; it keeps serving others."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[RoundTripError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        FailedPreconditionError,
        InternalError,
    )
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def from_status(code: grpc.StatusCode, message: str) -> RoundTripError:
    """The exception for ``code``, carrying the worker's message."""
    return _BY_CODE.get(code, RoundTripError)(message, code)


def from_rpc_code(number: int, message: str) -> RoundTripError:
    """The exception for a numeric google.rpc.Code (as in a stream's ``StreamError``)."""
    return from_status(_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN), message)


def from_rpc_error(error: grpc.RpcError) -> RoundTripError:
    """Translate a ``grpc.RpcError`` (sync or aio) into the hierarchy above."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return from_status(code, details or "")
