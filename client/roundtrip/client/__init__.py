"""Thin client for the RoundTrip worker: grpcio, protobuf and numpy, no JAX.

Installed as the ``roundtrip-worker`` distribution (the ``server`` extra adds the worker
itself); imported as ``roundtrip.client``.

>>> from roundtrip.client import RoundTripClient
>>> with RoundTripClient(worker_target, timeout=10) as client:
...     client.wait_until_serving(timeout=30)
...     result = client.round_trip(0, [1.0, 2.0, 3.0], 4, metadata=[("x-request-id", "42")])
>>> result.as_list()
[-4.221933364868164, -4.221933364868164, 0.0]
"""

from roundtrip.client.aio import AsyncRoundTripClient
from roundtrip.client.channel import NO_DEADLINE, tls_credentials
from roundtrip.client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RoundTripError,
    UnauthenticatedError,
    UnavailableError,
)
from roundtrip.client.messages import Outcome, RoundTripResult
from roundtrip.client.streams import StreamOutcome
from roundtrip.client.sync import RoundTripClient
from roundtrip.wire.version import __version__

__all__ = [
    "NO_DEADLINE",
    "AsyncRoundTripClient",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "Outcome",
    "ResourceExhaustedError",
    "RoundTripClient",
    "RoundTripError",
    "RoundTripResult",
    "StreamOutcome",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
    "tls_credentials",
]
