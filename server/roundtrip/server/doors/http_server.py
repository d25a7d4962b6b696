"""The REST door's HTTP server (aiohttp): its listening site, how a connection's errors are
logged and counted, and which caller a request is charged to."""

from __future__ import annotations

import logging
import ssl
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import ClientConnectionError, web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)


def caller_of(request: web.Request) -> str:
    """The caller a REST request is charged to: its connection (:func:`peer_name`)."""
    transport = request.transport
    return peer_name(transport.get_extra_info("peername") if transport is not None else None)


def peer_name(address: Any) -> str:
    """A socket's peer address named as gRPC names a peer.

    >>> peer_name(("127.0.0.1", 5000)), peer_name(("::1", 5000, 0, 0)), peer_name(None)
    ('ipv4:127.0.0.1:5000', 'ipv6:[::1]:5000', 'unknown')
    """
    if not address:
        return "unknown"
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class HttpErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger aiohttp's connection handler reports to. A malformed request, or a caller
    that hung up, is the caller's doing: a WARNING (or DEBUG) line naming it, counted as
    the status it got (INVALID_ARGUMENT, CANCELLED), never an ERROR with a traceback; what
    is left is a failure of this worker's and logged as one."""

    def __init__(self, count: Callable[[str], None]) -> None:
        super().__init__(log, {})
        self._count = count

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(error, HttpProcessingError):
            self._count("INVALID_ARGUMENT")
            log.warning("malformed HTTP request", extra={"status": 400, "error": str(error)})
        elif isinstance(error, ConnectionError | ClientConnectionError):
            self._count("CANCELLED")
            log.debug("HTTP caller gone", extra={"error": repr(error)})
        else:
            log.error(str(msg) % args if args else str(msg), exc_info=exc_info)


async def start(
    application: web.Application,
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    idle_timeout_s: float,
    count: Callable[[str], None],
) -> tuple[web.AppRunner, int]:
    """Serve ``application`` on ``host:port`` (0 picks a free port); the runner and bound
    port. ``count``: counts a connection's failure by the status it got (:class:`HttpErrorLog`).

    A connection without a complete request for ``idle_timeout_s`` is closed, whether idle
    or sending its headers slowly; a refused body is not read on (no lingering). Raises
    OSError when the port cannot be bound.
    """
    # the drain has already waited for open calls (they count in OpenCalls) when the runner
    # is cleaned up, so its own wait is short
    runner = web.AppRunner(
        application,
        logger=HttpErrorLog(count),
        access_log=None,
        shutdown_timeout=1.0,
        keepalive_timeout=idle_timeout_s,
        lingering_time=0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls, backlog=1024)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
