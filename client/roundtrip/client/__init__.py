"""Thin client for the RoundTrip worker: no JAX, just grpcio, protobuf and numpy.

>>> from roundtrip.client import RoundTripClient
>>> # with RoundTripClient("127.0.0.1:50051") as client:
>>> #     client.round_trip(0, [1.0, 2.0, 3.0], 4).as_list()
"""

from roundtrip.client.aio import AsyncRoundTripClient
from roundtrip.client.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RoundTripError,
    UnauthenticatedError,
    UnavailableError,
)
from roundtrip.client.messages import RoundTripResult
from roundtrip.client.sync import RoundTripClient, StreamOutcome

__all__ = [
    "AsyncRoundTripClient",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "RoundTripClient",
    "RoundTripError",
    "RoundTripResult",
    "StreamOutcome",
    "UnauthenticatedError",
    "UnavailableError",
]
