"""TLS, mutual TLS and the bearer token, against real workers with certificates made here.

trustme makes a throwaway CA per test module; the worker reads its files as an
operator's would (a Kubernetes Secret mounted as files).
"""

from __future__ import annotations

import gc
import http.client
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from roundtrip.client import RoundTripClient, RoundTripError, UnauthenticatedError, UnavailableError
from support.collector import left_for_the_collector
from support.pki import TOKEN, Pki
from support.workers import InProcessWorker, console_script, free_port, metric_value, serving_worker

WORKED = (0, [1.0, 2.0, 3.0], 4)
WORKED_ANSWER = [-4.221933364868164, -4.221933364868164, 0.0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def start(*flags: str, credentials: grpc.ChannelCredentials) -> Iterator[InProcessWorker]:
    with serving_worker("--warmup-shapes", "3:4", *flags, credentials=credentials) as process:
        yield process


@pytest.fixture(scope="module")
def mtls_worker(pki: Pki) -> Iterator[InProcessWorker]:
    """Mutual TLS plus a bearer token; health exempt from the token (the default)."""
    yield from start(
        "--tls-cert-file",
        pki.path("server.pem"),
        "--tls-key-file",
        pki.path("server.key"),
        "--tls-client-ca-file",
        pki.path("client-ca.pem"),
        "--auth-token-file",
        pki.path("token"),
        credentials=pki.credentials(),
    )


def call(
    worker: InProcessWorker, credentials: grpc.ChannelCredentials | None, token: str | None
) -> list[float]:
    with RoundTripClient(worker.target, credentials=credentials, token=token, timeout=30) as c:
        return c.round_trip(*WORKED).as_list()


def test_a_caller_with_its_certificate_and_the_token_gets_the_exact_answer(
    mtls_worker: InProcessWorker, pki: Pki
) -> None:
    assert call(mtls_worker, pki.credentials(), TOKEN) == WORKED_ANSWER


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_a_call_without_the_right_token_is_unauthenticated(
    mtls_worker: InProcessWorker, pki: Pki, token: str | None
) -> None:
    with pytest.raises(UnauthenticatedError, match="bearer token"):
        call(mtls_worker, pki.credentials(), token)


def test_a_refused_callers_message_is_not_kept(mtls_worker: InProcessWorker, pki: Pki) -> None:
    """A message refused for its token is freed as the call ends, not left in the reference
    cycle grpc's abort makes for a collector pass to find (one per refused call: an
    attacker without the token could fill the pod's memory with them)."""
    x = np.zeros(1 << 20, np.float32)  # 4 MiB
    with left_for_the_collector() as found:
        for _ in range(3):
            with (
                RoundTripClient(mtls_worker.target, credentials=pki.credentials()) as c,
                pytest.raises(UnauthenticatedError),
            ):
                c.round_trip(1, x, 4)
    kept = [
        len(held)
        for thing in found
        for held in gc.get_referents(thing)
        if isinstance(held, (bytes, bytearray, memoryview)) and len(held) >= x.nbytes
    ]
    assert kept == []


def test_every_method_needs_the_token(mtls_worker: InProcessWorker, pki: Pki) -> None:
    with RoundTripClient(mtls_worker.target, credentials=pki.credentials(), timeout=30) as c:
        with pytest.raises(UnauthenticatedError):
            c.server_info()
        with pytest.raises(UnauthenticatedError):  # the stream itself is refused
            list(c.stream([WORKED]))


def test_health_needs_no_token_but_reflection_does(mtls_worker: InProcessWorker, pki: Pki) -> None:
    with grpc.secure_channel(mtls_worker.target, pki.credentials()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection.ServerReflectionInfo(iter([ask]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "client_cert", [None, "stranger"], ids=["no-client-certificate", "certificate-of-another-ca"]
)
def test_mutual_tls_refuses_callers_without_a_trusted_certificate(
    mtls_worker: InProcessWorker, pki: Pki, client_cert: str | None
) -> None:
    with pytest.raises(UnavailableError):
        call(mtls_worker, pki.credentials(client_cert), TOKEN)


def test_plaintext_callers_cannot_talk_to_a_tls_worker(mtls_worker: InProcessWorker) -> None:
    with pytest.raises(UnavailableError):
        call(mtls_worker, None, TOKEN)


def test_refusals_are_counted_and_the_worker_keeps_serving(
    mtls_worker: InProcessWorker, pki: Pki
) -> None:
    with pytest.raises(RoundTripError):
        call(mtls_worker, pki.credentials(), "wrong")
    text = mtls_worker.scrape()
    assert (
        metric_value(
            text,
            'roundtrip_unauthenticated_total{method="/roundtrip.v1.RoundTripService/RoundTrip"}',
        )
        >= 1
    )
    assert call(mtls_worker, pki.credentials(), TOKEN) == WORKED_ANSWER


def test_server_only_tls_with_reflection_exempt_and_plaintext_probes(pki: Pki) -> None:
    """TLS without client certificates; a token, with health and reflection both exempt;
    a plaintext health-only port for Kubernetes probes, which cannot speak TLS."""
    probe_port = free_port()
    for worker in start(
        "--plaintext-health-port",
        str(probe_port),
        "--tls-cert-file",
        pki.path("server.pem"),
        "--tls-key-file",
        pki.path("server.key"),
        "--auth-token-file",
        pki.path("token"),
        "--auth-exempt",
        "health,reflection",
        credentials=pki.credentials(None),
    ):
        assert call(worker, pki.credentials(None), TOKEN) == WORKED_ANSWER
        with pytest.raises(UnauthenticatedError):
            call(worker, pki.credentials(None), None)
        with grpc.secure_channel(worker.target, pki.credentials(None)) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            answer = next(reflection.ServerReflectionInfo(iter([ask]), timeout=10))
            names = {service.name for service in answer.list_services_response.service}
            assert "roundtrip.v1.RoundTripService" in names
        with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as plaintext:
            health = health_pb2_grpc.HealthStub(plaintext)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with RoundTripClient(f"127.0.0.1:{probe_port}", token=TOKEN) as c:
                with pytest.raises(RoundTripError) as only_health:
                    c.round_trip(*WORKED)
                assert only_health.value.code == grpc.StatusCode.UNIMPLEMENTED


def https(
    worker: InProcessWorker, pki: Pki, path: str, *, client: str | None, token: str | None
) -> int:
    """A V2 REST call over HTTPS with ``client``'s certificate (None: none) and ``token``."""
    context = ssl.create_default_context(cafile=pki.path("server-ca.pem"))
    if client is not None:
        context.load_cert_chain(pki.path(f"{client}.pem"), pki.path(f"{client}.key"))
    request = urllib.request.Request(f"https://127.0.0.1:{worker.http_port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_v2_rest_has_the_same_tls_and_token(mtls_worker: InProcessWorker, pki: Pki) -> None:
    metadata = "/v2/models/roundtrip"
    assert https(mtls_worker, pki, metadata, client="client", token=TOKEN) == 200
    assert https(mtls_worker, pki, metadata, client="client", token=None) == 401
    assert https(mtls_worker, pki, "/v2/health/ready", client="client", token=None) == 200
    for client in ("stranger", None):  # the handshake refuses them before any request
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            https(mtls_worker, pki, metadata, client=client, token=TOKEN)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{mtls_worker.http_port}/v2", timeout=10)


def test_cli_ready_says_tls_when_the_worker_speaks_it_and_the_caller_does_not(
    mtls_worker: InProcessWorker, pki: Pki
) -> None:
    """Not "warming up" (1): a wait loop would never end. 2, naming TLS and the fix."""
    ready = [console_script("roundtrip"), "ready", "--target", mtls_worker.target]
    plain = subprocess.run([*ready, "--timeout", "3"], capture_output=True, text=True)
    assert plain.returncode == 2
    assert "speaks TLS: pass --ca-file" in plain.stderr
    stranger = subprocess.run(
        [*ready, "--ca-file", pki.path("client-ca.pem"), "--timeout", "3"],
        capture_output=True,
        text=True,
    )
    assert stranger.returncode == 2
    assert "TLS handshake" in stranger.stderr
    trusted = ["--ca-file", pki.path("server-ca.pem")]
    trusted += ["--cert-file", pki.path("client.pem"), "--key-file", pki.path("client.key")]
    done = subprocess.run([*ready, *trusted], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    started = time.monotonic()  # what waiting cannot fix is said before waiting
    waited = subprocess.run([*ready, "--wait", "120"], capture_output=True, text=True)
    assert waited.returncode == 2
    assert "speaks TLS: pass --ca-file" in waited.stderr
    assert time.monotonic() - started < 60
    rest = [console_script("roundtrip"), "ready", "--target", f"127.0.0.1:{mtls_worker.http_port}"]
    https = subprocess.run([*rest, *trusted], capture_output=True, text=True)
    assert https.returncode == 2
    assert "speaks HTTPS (HTTP/1 over TLS), not gRPC" in https.stderr


def test_cli_calls_to_a_tls_worker_in_plaintext_say_so(mtls_worker: InProcessWorker) -> None:
    """Not gRPC's "Socket closed": the cause, and the option that fixes it."""
    done = subprocess.run(
        [console_script("roundtrip"), "info", "--target", mtls_worker.target, "--timeout", "5"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "speaks TLS: pass --ca-file" in done.stderr
