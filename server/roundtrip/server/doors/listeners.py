"""The worker's listening sockets: the gRPC server's options, binding a port (a taken one
is the operator's to fix: :class:`PortUnavailable`, exit status 2), and the plaintext
health listener for probes when TLS is on.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2_grpc

from roundtrip.server.config import WorkerConfig


def server_options(config: WorkerConfig) -> list[tuple[str, int]]:
    """gRPC server options: one message limit both ways, pending calls, connections and
    streams per connection, connection age, keepalive.

    What gRPC holds of messages still arriving is bounded by ``max_connections`` x
    ``max_concurrent_streams`` x ``max_message_bytes``, for as long as a connection lives:
    the server pings every 20 s and drops a peer that does not answer within 10 s (a caller
    that stalled, or vanished), and asks every connection to go away at
    ``max_connection_age_s``. The client library pings every 30 s during calls; the server
    accepts pings down to every 10 s so it never answers them with "too many pings".
    """
    options = [
        # grpcio binds with SO_REUSEPORT by default: a second worker on a taken port would
        # share its traffic silently instead of failing to start
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # gRPC core cancels calls beyond these before any handler sees them; admission is
        # the batcher's bounded queue, which answers RESOURCE_EXHAUSTED instead
        ("grpc.server.max_pending_requests", config.max_pending_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", config.max_pending_rpcs),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]
    if config.max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", config.max_concurrent_streams))
    if config.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)),
        ]
    return options


class PortUnavailable(Exception):
    """A port the worker was told to listen on cannot be bound (taken, or not allowed)."""


def listen(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    *,
    knob: str,
) -> int:
    """Bind ``address`` (TLS when ``credentials``); the bound port, or :class:`PortUnavailable`."""
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpcio raises on a failed bind (older releases returned 0)
        port = 0
    if port == 0:
        raise PortUnavailable(
            f"cannot listen on {address}: the port is taken or not allowed; "
            f"choose another {knob} (0 picks a free one)"
        )
    return port


async def health_only_server(
    health_servicer: health_aio.HealthServicer, address: str
) -> grpc.aio.Server:
    """A plaintext listener with just the health service: probes see the same status."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listen(server, address, None, knob="--plaintext-health-port")
    await server.start()
    return server
