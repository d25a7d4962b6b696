"""Every line the worker writes is one JSON object: its own events, the libraries' (gRPC
core's included, whose lines are not Python's), whatever callers do wrong."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest

from roundtrip.client import RoundTripClient, RoundTripError
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.pki import Pki
from support.workers import WorkerProcess

FLAGS = ("--warmup-shapes", "3:4")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def not_json(worker: WorkerProcess) -> list[str]:
    return [event["line"] for event in worker.events if event["event"] == "non-json"]


def grpc_call_at(port: int) -> None:
    """A plaintext gRPC call at ``port``: refused, whatever listens there."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RoundTripServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=3)


@pytest.fixture(scope="module")
def tls_worker(pki: Pki) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(*FLAGS, *pki.worker_flags(), credentials=pki.credentials(None))
    try:
        worker.wait_serving()
        yield worker
    finally:
        worker.kill()


def test_a_tls_worker_called_in_plaintext_and_at_its_rest_port_logs_json_only(
    tls_worker: WorkerProcess,
) -> None:
    for _ in range(5):
        grpc_call_at(tls_worker.port)  # plaintext callers: the handshake fails, in gRPC core
        grpc_call_at(tls_worker.http_port)  # a gRPC client at the REST port
    with socket.create_connection(("127.0.0.1", tls_worker.port)) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # HTTP/1 at the gRPC port
        raw.settimeout(5)
        raw.recv(1024)
    assert tls_worker.terminate() == 0
    assert not_json(tls_worker) == []
    handshakes = [e for e in tls_worker.events if "Handshake failed" in str(e.get("event"))]
    assert handshakes, "gRPC core's lines are relayed, not dropped"
    assert {(e["logger"], e["level"]) for e in handshakes} == {("native", "INFO")}
    assert all(e["source"].startswith("ssl_transport_security.cc:") for e in handshakes)


def test_a_grpc_client_at_the_rest_port_is_one_quiet_line_not_a_traceback() -> None:
    worker = WorkerProcess(*FLAGS)
    try:
        worker.wait_serving()
        grpc_call_at(worker.http_port)
        target = f"127.0.0.1:{worker.http_port}"
        with RoundTripClient(target, timeout=3) as client, pytest.raises(RoundTripError):
            client.server_info()
        assert worker.terminate() == 0
    finally:
        worker.kill()
    assert not_json(worker) == []
    assert [event for event in worker.events if event["level"] == "ERROR"] == []
    assert [event for event in worker.events if "exception" in event] == []
