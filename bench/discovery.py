"""Workers found the way a headless Service finds them: a DNS name whose A records are the
addresses of the workers that are ready, now.

Kubernetes answers a headless Service's name with one A record per ready pod; a gRPC
client given ``dns:///name:port`` resolves it, spreads calls over the addresses with
``round_robin``, and resolves again when a connection ends (a worker's
``max_connection_age_s``, a drain's GOAWAY, a worker gone), which is when it learns of new
pods. :class:`Records` is that name on loopback: a DNS server on ``127.0.0.1`` (UDP and TCP,
gRPC's c-ares resolver asks it when the target names it as the authority,
``dns://127.0.0.1:PORT/name:port``) answering with the addresses put in it, TTL 0.

>>> with Records("workers.rehearsal.test") as records:
...     records.addresses = ["127.0.0.2", "127.0.0.3"]
...     records.target(50051).startswith("dns://127.0.0.1:")
True
"""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Any

from dnslib import QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer


class Records(BaseResolver):  # type: ignore[misc]
    """The A records of one name, served until closed; ``addresses`` may change any time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses: list[str] = []
        with socket.socket() as probe:  # a port free for TCP; UDP's is then almost surely free
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._servers = [
            DNSServer(self, port=self.port, address="127.0.0.1", tcp=tcp, logger=_Quiet())
            for tcp in (False, True)
        ]
        for server in self._servers:
            server.start_thread()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        question = request.q
        if str(question.qname).rstrip(".") == self.name and question.qtype == QTYPE.A:
            for address in list(self.addresses):
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=0))
        return reply

    def target(self, port: int) -> str:
        """The gRPC target that resolves this name here."""
        return f"dns://127.0.0.1:{self.port}/{self.name}:{port}"

    def __enter__(self) -> Records:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for server in self._servers:
            server.stop()


class _Quiet:
    """dnslib's logger, saying nothing (it prints every query by default)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
