"""The ``/metrics`` HTTP server: Prometheus's text format on its own port, bounded.

prometheus_client's own server spends a thread per connection with no timeout, so slow or
idle clients could pile threads up without bound. :class:`MetricsServer` serves at most
``max_connections`` at once, each for at most ``timeout_s`` in all, and closes the one that
has held its slot longest when a new connection finds them all taken: a scraper always gets
in (tests/test_metrics.py).

>>> from prometheus_client import CollectorRegistry
>>> server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, max_connections=2, timeout_s=1)
>>> server.port > 0
True
>>> server.close()
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)


class MetricsServer:
    """``/metrics`` of ``registry`` served on ``host:port`` (0: a free port) from a daemon
    thread until :meth:`close`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_connections: int,
        timeout_s: float,
    ) -> None:
        self._server = make_server(
            host,
            port,
            make_wsgi_app(registry),
            server_class=_bounded_server_class(host, max_connections, timeout_s),
            handler_class=_timed_handler_class(timeout_s),
        )
        self.port = int(self._server.server_port)
        threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        ).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def _timed_handler_class(timeout_s: float) -> type[WSGIRequestHandler]:
    # StreamRequestHandler applies ``timeout`` to each connection's socket.
    return type("TimedMetricsHandler", (_QuietHandler,), {"timeout": timeout_s})


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, ``max_connections`` at once, each for at most ``timeout_s``
    in all (however slowly it trickles). When every slot is taken, the connection that has
    held its slot longest is closed to make room, so a scraper is served at once even while
    slow clients hold the others."""

    request_queue_size = 64
    max_connections = 8
    timeout_s = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._open: dict[Any, float] = {}  # socket -> when it must end, oldest first
        self._lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(*args, **kwargs)  # closes itself when it cannot bind: set up first
        self._reaper = threading.Thread(target=self._reap, name="metrics-reaper", daemon=True)
        self._reaper.start()

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with self._lock:
                oldest = next(iter(self._open), None)
            if oldest is not None:
                _shut(oldest)  # its thread ends and gives its slot back
            self._slots.acquire()
        with self._lock:
            self._open[request] = time.monotonic() + self.timeout_s
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._lock:
            held = self._open.pop(request, None) is not None
        if held:
            self._slots.release()

    def _reap(self) -> None:
        """End every connection past its time, a few times a second (one thread for all)."""
        every = min(0.25, self.timeout_s / 4)
        while not self._closed.wait(every):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, ends in self._open.items() if ends <= now]
            for sock in late:
                _shut(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that ended badly (idle past the timeout, reset by its client): one
        JSON log line, not socketserver's traceback on stderr."""
        error = sys.exc_info()[1]
        log.debug(
            "metrics connection ended", extra={"client": client_address, "error": repr(error)}
        )


def _shut(connection: socket.socket) -> None:
    """End a metrics connection now: its thread's next read or write fails."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _bounded_server_class(host: str, max_connections: int, timeout_s: float) -> type[WSGIServer]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return type(
        "BoundedMetricsServer",
        (_BoundedServer,),
        {"max_connections": max_connections, "address_family": family, "timeout_s": timeout_s},
    )
