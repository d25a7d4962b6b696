"""Callers for the tests that attack the worker: work run in threads, a V2 REST post, and
what watches the worker meanwhile (its health polled as a probe would, a metric sampled).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.workers import WorkerProcess

INFER = "/v2/models/roundtrip/infer"
MIB = 1024 * 1024


def in_threads(*work: Callable[[], Any]) -> list[Any]:
    results: list[Any] = [None] * len(work)

    def run(index: int) -> None:
        results[index] = work[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return results


def post(
    port: int, body: bytes, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, bytes]:
    """POST an infer body; (status, answer), or (0, b"") when the worker closed the
    connection before the whole body was sent (it refused it mid-upload)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", INFER, body, headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    except (BrokenPipeError, ConnectionResetError):
        return 0, b""
    finally:
        connection.close()


class _Watch:
    """Something checked every ``every_s`` on a thread while the ``with`` block runs."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.check()

    def check(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class HealthPoller(_Watch):
    """gRPC health every ``every_s``, each with ``deadline_s``: the readiness probe, tighter."""

    def __init__(self, target: str, every_s: float = 0.1, deadline_s: float = 0.25) -> None:
        super().__init__(every_s)
        self.late: list[str] = []
        self.polls = 0
        self._deadline_s = deadline_s
        self._channel = grpc.insecure_channel(target)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connected first

    def check(self) -> None:
        try:
            self._stub.Check(health_pb2.HealthCheckRequest(), timeout=self._deadline_s)
        except grpc.RpcError as error:
            self.late.append(f"{error.code().name} at poll {self.polls}")
        self.polls += 1

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._channel.close()


class Sampler(_Watch):
    """A metric sampled every ``every_s`` while the block runs: its largest value."""

    def __init__(self, worker: WorkerProcess, sample: str, every_s: float = 0.02) -> None:
        super().__init__(every_s)
        self.most = 0.0
        self.samples = 0
        self._worker = worker
        self._sample = sample

    def check(self) -> None:
        self.most = max(self.most, self._worker.metric(self._sample))
        self.samples += 1


def outcome(call: Callable[..., Any], message: Any) -> str:
    """How one call of ``message`` ended: OK, or its code and details."""
    try:
        call(message, timeout=60)
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"
    return "OK"


def stalled_upload(port: int, declared: int, sent: int) -> socket.socket:
    """An upload that declares ``declared`` bytes of binary tensor data, sends ``sent`` of
    them and goes silent."""
    head = json.dumps({"inputs": []}).encode()
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(
        (
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\n\r\n"
        ).encode()
        + head
    )
    chunk = bytes(MIB)
    for _ in range(sent // MIB):
        connection.sendall(chunk)
    return connection
