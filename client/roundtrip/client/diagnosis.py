"""Why a worker cannot be talked to at all, found by looking at its port rather than by
waiting on it: nothing listens there, TLS on one side only, a TLS handshake that fails, or a
port that speaks HTTP/1 (the worker's REST or metrics port) where gRPC was meant.

gRPC itself reports each of these as UNAVAILABLE ("Socket closed", "failed to connect"),
the same status a draining worker answers with, so a caller cannot tell a worker that will
come from one that never will. :func:`diagnose` can: the ``roundtrip`` command says it
before it waits, and after any call that ends UNAVAILABLE.

>>> with socket.socket() as closed:  # a port nothing listens on
...     closed.bind(("127.0.0.1", 0))
...     port = closed.getsockname()[1]
>>> problem = diagnose(f"127.0.0.1:{port}")
>>> problem.message  # doctest: +ELLIPSIS
'nothing accepts connections at 127.0.0.1:...'
>>> problem.lasting  # a worker that is starting has not bound its port yet
False
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: What an HTTP/2 client sends first: the connection preface and an empty SETTINGS frame.
#: A gRPC server answers with its own SETTINGS frame; an HTTP/1 server with ``HTTP/1.x 400``.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class Problem:
    """Why the target cannot be talked to, said so that the reader knows what to change."""

    message: str
    #: True when waiting cannot fix it (TLS or protocol on the wrong side); False when
    #: nothing listens yet (a worker that is starting binds its port after it imports JAX).
    lasting: bool


def diagnose(
    target: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    timeout: float = 5.0,
) -> Problem | None:
    """Why a worker at ``target`` (``host:port``) cannot be talked to at all, or None when a
    connection, its handshake and HTTP/2 succeed (so a worker that is not serving is warming
    up or draining) or when ``target`` is a name only gRPC's resolver understands."""
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    address = (host, int(port))

    def connected(look: Callable[[socket.socket], T]) -> T:
        """``look`` at a new connection to the target (:class:`_Refused`: none accepted)."""
        try:
            raw = socket.create_connection(address, timeout=timeout)
        except OSError as error:
            raise _Refused(error) from None
        with raw:
            return look(raw)

    try:
        return _looked_at(target, host, (ca_file, cert_file, key_file), connected)
    except _Refused as refused:
        return Problem(f"nothing accepts connections at {target} ({refused})", lasting=False)


class _Refused(Exception):
    """No connection to the target: nothing accepts them there (or nothing answers)."""


def _looked_at(
    target: str,
    host: str,
    files: tuple[str | None, str | None, str | None],
    connected: Callable[[Callable[[socket.socket], Any]], Any],
) -> Problem | None:
    """What new connections to ``target`` show: TLS or not, HTTP/2 or not, and whether the
    caller's own TLS ``files`` (CA, certificate, key) complete a handshake."""
    protocol = connected(lambda raw: _handshake(raw, host, _any_certificate()))
    if isinstance(protocol, ssl.SSLError | OSError):  # no TLS there
        speaks = connected(_speaks_instead_of_http2)
        if speaks is not None:
            return Problem(
                f"{target} speaks {speaks}, not gRPC: is it the worker's REST or metrics port? "
                "Its gRPC port is --port (50051 unless set)",
                lasting=True,
            )
        if any(files):
            return Problem(
                f"the worker at {target} speaks plaintext, not TLS: drop the TLS options",
                lasting=True,
            )
        return None
    if protocol != "h2":
        return Problem(
            f"{target} speaks HTTPS (HTTP/1 over TLS), not gRPC: is it the worker's REST or "
            "metrics port? Its gRPC port is --port (50051 unless set)",
            lasting=True,
        )
    if not any(files):
        return Problem(
            f"the worker at {target} speaks TLS: pass --ca-file (and --cert-file and "
            "--key-file if it asks for a client certificate)",
            lasting=True,
        )
    ca_file, cert_file, key_file = files
    trusted = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        trusted.load_cert_chain(cert_file, key_file)
    failed = connected(lambda raw: _handshake(raw, host, trusted))
    if isinstance(failed, ssl.SSLError | OSError):
        return Problem(f"the TLS handshake with {target} failed: {failed}", lasting=True)
    return None


def _any_certificate() -> ssl.SSLContext:
    """A context that completes a handshake with any certificate: is it TLS at all?"""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _handshake(
    raw: socket.socket, host: str, context: ssl.SSLContext
) -> str | ssl.SSLError | OSError | None:
    """The protocol a TLS handshake over ``raw`` agreed on (``"h2"`` for gRPC; None: none
    named), or the error it failed with."""
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(raw, server_hostname=host) as wrapped:
            return wrapped.selected_alpn_protocol()
    except (ssl.SSLError, OSError) as error:
        return error


def _speaks_instead_of_http2(raw: socket.socket) -> str | None:
    """What the server answers an HTTP/2 preface with, when it is not HTTP/2's own SETTINGS
    frame (a 9-byte header whose fourth byte is type 4); None: HTTP/2, or no answer."""
    try:
        raw.sendall(HTTP2_PREFACE)
        reply = raw.recv(16)
    except OSError:
        return None
    if not reply or (len(reply) >= 4 and reply[3] == 4):
        return None
    if reply.startswith((b"HTTP/", b"<")):  # a status line, or http.server's bare error page
        return "HTTP/1"
    return "something other than HTTP/2"
