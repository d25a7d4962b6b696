"""Transport security and caller authentication for both ports: TLS (and mutual TLS) from
one set of PEM files, and one bearer-token check.

TLS on the gRPC port is gRPC's own (``grpc.ssl_server_credentials``), on the REST port
Python's ``ssl``: both present ``tls_cert_file``, and with ``tls_client_ca_file`` both
require a client certificate that CA signed, so the handshake refuses anyone else before
a call exists. :class:`TokenCheck` is the one token comparison (constant time), used by the
gRPC interceptor (:class:`BearerTokenInterceptor`) and by the REST door's middleware, with
the same exemptions (``auth_exempt``: Kubernetes probes cannot send a token).

>>> check = TokenCheck("s3cret", exempt=["health"])
>>> check.accepts("Bearer s3cret"), check.accepts(b"Bearer guess"), check.accepts(None)
(True, False, False)
>>> check.exempt_method("/grpc.health.v1.Health/Check"), check.exempt_path("/v2/health/ready")
(True, True)
>>> check.exempt_method("/roundtrip.v1.RoundTripService/RoundTrip")
False
"""

from __future__ import annotations

import hmac
import logging
import ssl
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
#: REST's health routes, exempt from the token when ``health`` is.
HTTP_HEALTH_PREFIX = "/v2/health/"


def server_credentials(config: WorkerConfig) -> grpc.ServerCredentials | None:
    """The gRPC port's TLS credentials from the configured PEM files, or None (plaintext)."""
    if not config.tls_cert_file:
        return None
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def ssl_context(config: WorkerConfig) -> ssl.SSLContext | None:
    """The REST port's TLS from the same files, with the same client-certificate
    requirement, or None (plaintext)."""
    if not config.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    if config.tls_client_ca_file:
        context.load_verify_locations(config.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TokenCheck:
    """``Authorization: Bearer <token>`` compared in constant time; ``exempt`` names what
    may be called without it (``health``, ``reflection``)."""

    def __init__(self, token: str, exempt: Iterable[str]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._exempt = frozenset(exempt)
        self._exempt_methods = tuple(f"/{EXEMPTABLE_SERVICES[name]}/" for name in self._exempt)

    def accepts(self, given: str | bytes | None) -> bool:
        if given is None:
            return False
        return hmac.compare_digest(
            given if isinstance(given, bytes) else given.encode(), self._expected
        )

    def exempt_method(self, method: str) -> bool:
        """Whether the gRPC method (``/package.Service/Method``) needs no token."""
        return method.startswith(self._exempt_methods)

    def exempt_path(self, path: str) -> bool:
        """Whether the REST path needs no token."""
        return "health" in self._exempt and path.startswith(HTTP_HEALTH_PREFIX)


def token_check(config: WorkerConfig) -> TokenCheck | None:
    """The configured token check, or None when no token is configured."""
    token = config.auth_token()
    if not token:
        return None
    exempt = config.auth_exempt_services()
    log.info("bearer token required", extra={"exempt": sorted(exempt)})
    return TokenCheck(token, exempt)


def _terminator(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that answers ``code`` without reading on."""

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        del request  # not kept in the cycle grpc's abort makes (see grpc_calls.unary)
        await context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(ServerInterceptor):
    """Refuses gRPC calls that :class:`TokenCheck` does not accept with UNAUTHENTICATED; a
    call without the token never reaches a door."""

    def __init__(
        self, check: TokenCheck, on_refused: Callable[[str], None] = lambda method: None
    ) -> None:
        self._check = check
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._check.exempt_method(method):
            return handler
        given = next(
            (
                value
                for key, value in handler_call_details.invocation_metadata or ()
                if key == "authorization"
            ),
            None,
        )
        if self._check.accepts(given):
            return handler
        self._on_refused(method)
        return _terminator(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
        )


def interceptors(
    check: TokenCheck | None, on_refused: Callable[[str], None]
) -> list[ServerInterceptor]:
    """The gRPC server's interceptors: the token check when a token is configured."""
    return [] if check is None else [BearerTokenInterceptor(check, on_refused)]
