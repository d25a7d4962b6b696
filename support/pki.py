"""Certificates for tests, made here: a server CA with the worker's certificate, a client CA
with a client certificate, a stranger CA, and a bearer token, as files an operator would
mount (a Kubernetes Secret)."""

from __future__ import annotations

from pathlib import Path

import grpc
import trustme

from roundtrip.client.channel import tls_credentials

TOKEN = "s3cret-token-for-tests"


class Pki:
    """A server CA with the worker's certificate, and a client CA with a client certificate."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        server_ca, client_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
        server_ca.cert_pem.write_to_path(str(directory / "server-ca.pem"))
        client_ca.cert_pem.write_to_path(str(directory / "client-ca.pem"))
        served = server_ca.issue_cert("127.0.0.1", "localhost")
        served.private_key_pem.write_to_path(str(directory / "server.key"))
        served.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
        for name, ca in (("client", client_ca), ("stranger", stranger_ca)):
            cert = ca.issue_cert("caller@example.test")
            cert.private_key_pem.write_to_path(str(directory / f"{name}.key"))
            cert.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
        (directory / "token").write_text(TOKEN + "\n")

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def credentials(self, client: str | None = "client") -> grpc.ChannelCredentials:
        if client is None:
            return tls_credentials(self.path("server-ca.pem"))
        return tls_credentials(
            self.path("server-ca.pem"), self.path(f"{client}.pem"), self.path(f"{client}.key")
        )

    def worker_flags(self) -> list[str]:
        """The flags of a worker that speaks TLS with the server certificate."""
        return [
            "--tls-cert-file",
            self.path("server.pem"),
            "--tls-key-file",
            self.path("server.key"),
        ]
