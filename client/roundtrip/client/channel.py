"""Channel settings both clients share: message limits, service config, keepalive, security.

Retries, timeouts and load balancing are declared in the gRPC service config
(not coded as loops): UNAVAILABLE is retried with exponential backoff, a
``dns:///`` target with several addresses is spread with ``round_robin``, and
the channel watches each worker's ``grpc.health.v1`` status, so a worker that
turns NOT_SERVING (warming up, or draining before it stops) gets no new calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "roundtrip.v1.RoundTripService"

SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": SERVICE},
    "methodConfig": [
        {
            "name": [
                {"service": SERVICE, "method": "RoundTrip"},
                {"service": SERVICE, "method": "GetServerInfo"},
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options for ``grpc.*_channel``: both message limits, the service config, keepalive."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


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
    metadata: tuple[tuple[str, str], ...], token: str | None
) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus ``authorization: Bearer <token>`` when a token is given."""
    return (*metadata, ("authorization", f"Bearer {token}")) if token else metadata
