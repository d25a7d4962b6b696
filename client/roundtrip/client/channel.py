"""Channel settings both clients share: message limits, service config, keepalive, security.

Retries, timeouts and load balancing are declared in the gRPC service config
(not coded as loops): UNAVAILABLE is retried with exponential backoff, a
``dns:///`` target with several addresses is spread with ``round_robin``, and
the channel watches each worker's ``grpc.health.v1`` status, so a worker that
turns NOT_SERVING (warming up, or draining before it stops) gets no new calls.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2

from roundtrip.wire.metadata import FINGERPRINT_KEY

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "roundtrip.v1.RoundTripService"

#: The retry policy of the client's service config: UNAVAILABLE (no worker took the call:
#: none reachable, or one draining) tried again up to 3 times with exponential backoff.
RETRY_POLICY: Mapping[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
#: The unary methods the retry policy covers (a stream is resent by the client itself).
RETRIED = ("RoundTrip", "RoundTripBatch", "GetServerInfo")


def service_config(retry_policy: Mapping[str, Any] | None = RETRY_POLICY) -> dict[str, Any]:
    """The client's gRPC service config: ``round_robin`` over the target's addresses, each
    address's ``grpc.health.v1`` status watched, and ``retry_policy`` (a gRPC
    ``retryPolicy``; None: no retries, where a service mesh retries) on the unary methods.
    Changing the retry policy keeps load balancing and health checking.

    >>> config = service_config({**RETRY_POLICY, "maxAttempts": 2})
    >>> config["loadBalancingConfig"], config["healthCheckConfig"]["serviceName"]
    ([{'round_robin': {}}], 'roundtrip.v1.RoundTripService')
    >>> config["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    2
    >>> "retryPolicy" in service_config(None)["methodConfig"][0]
    False
    """
    method: dict[str, Any] = {"name": [{"service": SERVICE, "method": m} for m in RETRIED]}
    if retry_policy is not None:
        method["retryPolicy"] = dict(retry_policy)
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
        "methodConfig": [method],
    }


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    extra: Sequence[tuple[str, Any]] = (),
    retry_policy: Mapping[str, Any] | None = RETRY_POLICY,
) -> list[tuple[str, Any]]:
    """Options for ``grpc.*_channel``: both message limits, the service config (with
    ``retry_policy``), keepalive, then ``extra``, which replaces any of those it names.

    >>> dict(channel_options(extra=[("grpc.keepalive_time_ms", 5000)]))["grpc.keepalive_time_ms"]
    5000
    """
    options: dict[str, Any] = {
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.service_config": json.dumps(service_config(retry_policy)),
        "grpc.enable_retries": 1,
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 0,
    }
    options.update(extra)
    return list(options.items())


class NoDeadline(enum.Enum):
    """The type of :data:`NO_DEADLINE`."""

    NO_DEADLINE = "no deadline"


NO_DEADLINE: Final = NoDeadline.NO_DEADLINE
"""Pass as a call's ``timeout`` for a call with no deadline at all (``None`` means the
client's default)."""

Timeout = float | NoDeadline | None
"""A call's ``timeout``: seconds, :data:`NO_DEADLINE`, or ``None`` for the client's default."""

Metadata = Sequence[tuple[str, str]]
"""gRPC metadata: ``(key, value)`` pairs, keys lower-case, e.g. ``[("x-request-id", "42")]``."""


#: What ``is_serving`` asks ``grpc.health.v1``: the RoundTrip service's own status.
HEALTH_CHECK = health_pb2.HealthCheckRequest(service=SERVICE)

#: A health check ending with these means no worker answered: not serving, nothing to raise.
NOT_REACHED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

#: Pauses between readiness checks in ``wait_until_serving``, the last one repeated.
READY_PAUSES_S = (0.05, 0.1, 0.2, 0.5, 1.0)


def ready_pause(attempt: int) -> float:
    """Seconds to wait after readiness check ``attempt`` (0, 1, ...) failed.

    >>> [ready_pause(n) for n in range(7)]
    [0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 1.0]
    """
    return READY_PAUSES_S[min(attempt, len(READY_PAUSES_S) - 1)]


def call_timeout(default: float | None, timeout: Timeout) -> float | None:
    """The deadline one call sends, in seconds from now (``None``: no deadline).

    >>> call_timeout(30.0, None), call_timeout(30.0, 2.5), call_timeout(30.0, NO_DEADLINE)
    (30.0, 2.5, None)
    """
    if timeout is None:
        return default
    if isinstance(timeout, NoDeadline):
        return None
    return timeout


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS from PEM files: ``ca_file`` verifies the worker (system roots when None);
    ``cert_file`` and ``key_file`` present a client certificate (mutual TLS)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


def call_metadata(
    metadata: Metadata, token: str | None, fingerprint: str | None = None
) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus ``authorization: Bearer <token>`` when a token is given, and the
    numerics fingerprint every call insists on when one is given.

    >>> for pair in call_metadata([("x-request-id", "7")], "s3cret", "745b220f1ebd8d16"):
    ...     print(pair)
    ('x-request-id', '7')
    ('authorization', 'Bearer s3cret')
    ('roundtrip-fingerprint', '745b220f1ebd8d16')
    """
    pairs = tuple(metadata)
    if token:
        pairs = (*pairs, ("authorization", f"Bearer {token}"))
    if fingerprint:
        pairs = (*pairs, (FINGERPRINT_KEY, fingerprint))
    return pairs
