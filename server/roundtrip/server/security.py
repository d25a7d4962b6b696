"""Transport security and caller authentication: TLS/mTLS credentials and the bearer token.

TLS is gRPC's own (``grpc.ssl_server_credentials``): the server presents
``tls_cert_file``; with ``tls_client_ca_file`` it also requires a client
certificate signed by that CA, and the handshake refuses anyone else before a
call exists. The bearer token is checked per call by :class:`BearerTokenInterceptor`
in constant time; a call without it never reaches the servicer.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from roundtrip.server.config import WorkerConfig

if TYPE_CHECKING:  # generic only in the type stubs
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    ServerInterceptor = grpc.aio.ServerInterceptor

log = logging.getLogger(__name__)

EXEMPTABLE_SERVICES = {"health": health.SERVICE_NAME, "reflection": reflection.SERVICE_NAME}


def server_credentials(config: WorkerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, or None for plaintext."""
    if not config.tls_cert_file:
        return None
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _terminator(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that answers ``code`` without reading on."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    Methods of ``exempt_services`` (full service names) pass without a token:
    Kubernetes gRPC probes cannot send one.
    """

    def __init__(
        self,
        token: str,
        exempt_services: Iterable[str],
        on_refused: Callable[[str], None] = lambda method: None,
    ) -> None:
        self._expected = f"Bearer {token}".encode()
        self._exempt = tuple(f"/{service}/" for service in exempt_services)
        self._on_refused = on_refused

    def _authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        self._on_refused(method)
        return _terminator(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
        )


def interceptors(
    config: WorkerConfig, on_refused: Callable[[str], None]
) -> list[ServerInterceptor]:
    """The server's interceptors for ``config``: the token check when a token is configured."""
    token = config.auth_token()
    if not token:
        return []
    exempt = [EXEMPTABLE_SERVICES[name] for name in config.auth_exempt_services()]
    log.info("bearer token required", extra={"exempt": exempt})
    return [BearerTokenInterceptor(token, exempt, on_refused)]
