"""Assembly of the worker: engine, batcher, servicer, health, reflection, metrics, security,
audit, signals.

Start order: bind and start the gRPC server with health NOT_SERVING, compile
and self-check (off the event loop), then SERVING. Stop order on SIGTERM or
SIGINT (:meth:`Worker.stop`): health NOT_SERVING while calls are still
answered for ``drain_announce_s``; then new calls are refused with
UNAVAILABLE and open ones get up to ``drain_grace_s`` to finish before the
server closes; then the batcher drains, and only then is the compute thread
released.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata

import grpc
import jax
import numpy as np
from aiohttp import web
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from roundtrip.server import admission, heap, numerics, rest, security, warmup
from roundtrip.server.audit import Auditor
from roundtrip.server.batcher import Batcher, Lane
from roundtrip.server.config import WorkerConfig
from roundtrip.server.engine import Engine, EngineStats
from roundtrip.server.eventloop import loop_name
from roundtrip.server.metrics import WorkerMetrics
from roundtrip.server.service import RoundTripServicer, add_to_server
from roundtrip.server.v2service import SERVICE as V2_SERVICE
from roundtrip.server.v2service import InferenceServicer
from roundtrip.server.validation import RequestLimits
from roundtrip.server.values import x64_enabled
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.wire.version import __version__

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RoundTripService"].full_name


def server_info(
    config: WorkerConfig, budget: admission.ByteBudget, lanes: int
) -> pb.GetServerInfoResponse:
    """What GetServerInfo answers: versions, backend, devices, 64-bit mode, limits."""
    return pb.GetServerInfoResponse(
        worker_version=__version__,
        jax_version=jax.__version__,
        flax_version=metadata.version("flax"),
        numpy_version=np.__version__,
        grpc_version=grpc.__version__,
        backend=jax.default_backend(),
        devices=[str(device) for device in jax.devices()],
        compute_lanes=lanes,
        x64_enabled=x64_enabled(),
        numerics=pb.NumericsIdentity(
            backend=jax.default_backend(),
            device_kind=jax.devices()[0].device_kind,
            xla_cpu_max_isa=numerics.pinned_isa(os.environ.get("XLA_FLAGS", "")),
            host_cpu_isa=numerics.host_isa(numerics.cpu_flags()),
            xla_flags=os.environ.get("XLA_FLAGS", ""),
        ),
        limits=pb.Limits(
            max_x_elements=config.max_x_elements,
            max_features=config.max_features,
            max_param_bytes=config.max_param_bytes,
            max_output_elements=config.max_output_elements,
            max_message_bytes=config.max_message_bytes,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.max_queue_delay_us,
            max_queue_size=config.max_queue_size,
            max_inflight_bytes=budget.limit,
            max_batch_items=config.max_batch_items,
            max_param_cache_bytes=config.max_param_cache_bytes,
        ),
    )


def compute_lanes(config: WorkerConfig) -> list[Lane]:
    """One lane per local device of JAX's backend, each with its own engine (executables,
    parameter cache: ``max_param_cache_bytes`` shared out evenly) and compute thread."""
    devices = jax.local_devices()
    return [
        Lane(
            Engine(
                max_compiled=config.max_compiled,
                max_batch_size=config.max_batch_size,
                max_param_cache_bytes=config.max_param_cache_bytes // len(devices),
                device=device,
            ),
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"jax-compute-{index}"),
            str(device),
        )
        for index, device in enumerate(devices)
    ]


def inflight_bytes(config: WorkerConfig) -> int:
    """``max_inflight_bytes``, with 0 resolved from the container's memory limit."""
    if config.max_inflight_bytes:
        return config.max_inflight_bytes
    return admission.default_inflight_bytes(admission.container_memory_limit())


@dataclass
class Worker:
    """A running worker: its server, bound port, health servicer and batcher."""

    config: WorkerConfig
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    batcher: Batcher
    metrics: WorkerMetrics
    auditor: Auditor
    servicer: RoundTripServicer
    pauses: heap.Pauses
    health_server: grpc.aio.Server | None = None
    http: web.AppRunner | None = None
    http_port: int | None = None
    metrics_port: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    serving: bool = False

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.serving = serving

    async def warm_up(self) -> None:
        """Compile and self-check on every lane at once (each on its own compute thread),
        then publish the numerics identity (every lane must give the same bits)."""
        loop = asyncio.get_running_loop()
        fingerprints = await asyncio.gather(
            *(
                loop.run_in_executor(
                    lane.executor,
                    warmup.warm_up,
                    lane.engine,
                    self.config.warmup_pairs(),
                    self.stopping,
                )
                for lane in self.batcher.lanes
            )
        )
        if len(set(fingerprints)) != 1:
            lanes = [lane.name for lane in self.batcher.lanes]
            by_lane = dict(zip(lanes, fingerprints, strict=True))
            raise warmup.SelfCheckFailed(f"the compute lanes give different bits: {by_lane}")
        identity = self.servicer.set_fingerprint(fingerprints[0])
        self.metrics.observe_numerics(identity)
        collector = heap.settle(self.config.gc_threshold)  # what start-up built stays
        await self.set_serving(True)
        log.info("serving", extra={"port": self.port, "numerics": identity, "gc": collector})

    async def stop(self) -> None:
        """Drain in two steps, then release: nothing a handler accepted is cut off.

        1. Announce: health turns NOT_SERVING (probes take the pod out of its
           Services, clients that watch health pick other workers) while calls
           are still answered normally, for ``drain_announce_s``.
        2. Refuse and finish: new calls get UNAVAILABLE (retryable), open
           streams send what they owe and end, and the worker waits up to
           ``drain_grace_s`` for every open call before the server closes.
        Only then do the batcher, the compute thread and the audit stop.
        """
        announce_s = self.config.drain_announce_s if self.serving else 0.0
        self.serving = False  # V2's ready routes now agree with health
        log.info(
            "draining",
            extra={
                "announce_s": announce_s,
                "grace_s": self.config.drain_grace_s,
                "inflight": int(self.metrics.value("roundtrip_inflight_requests")),
            },
        )
        self.stopping.set()  # a warm-up still compiling gives up at its next compilation
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(announce_s)
        # Calls already accepted (and stream messages already read) still reach the
        # batcher and are answered; only new calls are refused.
        self.servicer.calls.refuse_new()
        grace_started = time.monotonic()
        finished = await self.servicer.calls.wait_idle(self.config.drain_grace_s)
        log.info(
            "refusing",
            extra={
                "open_calls": self.servicer.calls.open,
                "waited_s": round(time.monotonic() - grace_started, 3),
                "all_finished": finished,
            },
        )
        remaining = max(self.config.drain_grace_s - (time.monotonic() - grace_started), 0.0)
        await self.server.stop(remaining)
        if self.http is not None:
            await self.http.cleanup()
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.batcher.drain()
        for lane in self.batcher.lanes:
            lane.executor.shutdown(wait=True)
        self.auditor.stop()
        self.pauses.unwatch()
        self.metrics.close()
        stats = EngineStats.total(lane.engine.stats for lane in self.batcher.lanes)
        log.info(
            "stopped",
            extra={
                "requests": stats.requests,
                "batches": stats.batches,
                "mean_batch_size": round(stats.requests / max(stats.batches, 1), 2),
                "compilations": stats.compilations,
                "compile_seconds": round(stats.compile_seconds, 3),
                "answered_by_code": self.metrics.answered_by_code(),
                "audited": int(self.metrics.value("roundtrip_audit_checks_total")),
                "audit_mismatches": int(self.metrics.value("roundtrip_audit_mismatches_total")),
            },
        )


def server_options(config: WorkerConfig) -> list[tuple[str, int]]:
    """gRPC server options: one message limit both ways, pending calls, connection age, keepalive.

    The client library pings every 30 s during calls; the server accepts pings
    down to every 10 s so it never answers them with "too many pings".
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # gRPC core cancels calls beyond these before any handler sees them; admission is
        # the batcher's bounded queue, which answers RESOURCE_EXHAUSTED instead
        ("grpc.server.max_pending_requests", config.max_pending_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", config.max_pending_rpcs),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]
    if config.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000)),
        ]
    return options


class PortUnavailable(Exception):
    """A port the worker was told to listen on cannot be bound (taken, or not allowed)."""


def listen(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    *,
    knob: str,
) -> int:
    """Bind ``address`` (TLS when ``credentials``); the bound port, or :class:`PortUnavailable`."""
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpcio raises on a failed bind (older releases returned 0)
        port = 0
    if port == 0:
        raise PortUnavailable(
            f"cannot listen on {address}: the port is taken or not allowed; "
            f"choose another {knob} (0 picks a free one)"
        )
    return port


async def health_only_server(
    health_servicer: health_aio.HealthServicer, address: str
) -> grpc.aio.Server:
    """A plaintext listener with just the health service: probes see the same status."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listen(server, address, None, knob="--plaintext-health-port")
    await server.start()
    return server


def use_compilation_cache(directory: str) -> None:
    """Point JAX's persistent compilation cache at ``directory`` (every executable is cached)."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


async def serve_http(
    config: WorkerConfig, inference: InferenceServicer
) -> tuple[web.AppRunner, int]:
    """The V2 REST endpoint on ``http_port``, with the gRPC port's TLS and bearer token."""
    tls = (
        rest.ssl_context(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
        if config.tls_cert_file
        else None
    )
    endpoint = rest.Endpoint(
        inference,
        max_body_bytes=config.max_message_bytes,
        token=config.auth_token(),
        health_exempt="health" in config.auth_exempt_services(),
    )
    try:
        return await rest.start(endpoint, config.host, config.http_port, tls=tls)
    except OSError as error:
        raise PortUnavailable(
            f"cannot serve HTTP on {config.host}:{config.http_port}: {error.strerror}; "
            "choose another --http-port (0 picks a free one, -1 turns it off)"
        ) from None


async def start(config: WorkerConfig) -> Worker:
    """Build and start a worker; health stays NOT_SERVING until :meth:`Worker.warm_up`."""
    if config.compilation_cache_dir:
        use_compilation_cache(config.compilation_cache_dir)
    budget = admission.ByteBudget(inflight_bytes(config))
    lanes = compute_lanes(config)
    log.info(
        "starting",
        extra={
            "backend": jax.default_backend(),
            "devices": [str(device) for device in jax.devices()],
            "lanes": [lane.name for lane in lanes],
            "event_loop": loop_name(asyncio.get_running_loop()),
            "config": config.as_dict(),
            "max_inflight_bytes": budget.limit,
            "container_memory_limit": admission.container_memory_limit(),
        },
    )
    metrics = WorkerMetrics(max_batch_size=config.max_batch_size)
    batcher = Batcher(
        lanes,
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=config.max_queue_delay_us,
        max_queue_size=config.max_queue_size,
        on_batch=metrics.observe_batch,
    )
    metrics.watch_lanes({lane.name: lane.engine for lane in lanes})
    pauses = heap.Pauses()
    pauses.watch()
    metrics.watch_collector(pauses)
    metrics.watch_queue(lambda: batcher.queued)
    metrics.watch_budget(lambda: budget.in_use, budget.limit)
    limits = RequestLimits(
        max_x_elements=config.max_x_elements,
        max_features=config.max_features,
        max_param_bytes=config.max_param_bytes,
        max_output_elements=config.max_output_elements,
    )
    auditor = Auditor(
        config.audit_fraction,
        config.audit_queue_size,
        on_outcome=metrics.observe_audit,
        on_skipped=metrics.audit_skipped.inc,
    )
    server = grpc.aio.server(
        options=server_options(config),
        interceptors=security.interceptors(config, metrics.refused_unauthenticated),
    )
    servicer = RoundTripServicer(
        batcher,
        limits,
        server_info(config, budget, len(lanes)),
        metrics,
        auditor,
        budget,
        max_stream_inflight=config.max_stream_inflight,
        max_batch_items=config.max_batch_items,
    )
    add_to_server(servicer, server)
    worker: Worker | None = None

    def ready() -> bool:  # V2's ServerReady: serving (self-checked) and not draining
        return worker is not None and worker.serving

    inference = InferenceServicer(servicer, ready=ready)
    add_to_server(inference, server, V2_SERVICE)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, V2_SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{config.host}:{config.port}"
    credentials = security.server_credentials(config)
    port = listen(server, address, credentials, knob="--port")
    worker = Worker(
        config, server, port, health_servicer, batcher, metrics, auditor, servicer, pauses
    )
    await worker.set_serving(False)
    if config.plaintext_health_port:
        worker.health_server = await health_only_server(
            health_servicer, f"{config.host}:{config.plaintext_health_port}"
        )
    try:
        metrics_port = metrics.serve(
            config.host,
            config.metrics_port,
            max_connections=config.metrics_max_connections,
            timeout_s=config.metrics_timeout_s,
        )
    except OSError as error:
        raise PortUnavailable(
            f"cannot serve metrics on {config.host}:{config.metrics_port}: {error.strerror}; "
            "choose another --metrics-port (0 picks a free one)"
        ) from None
    worker.metrics_port = metrics_port
    if config.http_port >= 0:
        worker.http, worker.http_port = await serve_http(config, inference)
    batcher.start()
    auditor.start()
    await server.start()
    log.info(
        "listening",
        extra={
            "host": config.host,
            "port": port,
            "metrics_port": metrics_port,
            "http_port": worker.http_port,
            "tls": credentials is not None,
            "mutual_tls": bool(config.tls_client_ca_file),
            "token_required": bool(config.auth_token_file),
        },
    )
    return worker


async def serve(config: WorkerConfig) -> None:
    """Run a worker until SIGINT or SIGTERM, then stop it gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    worker = await start(config)
    warming = asyncio.create_task(worker.warm_up())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({warming, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failure = warming.exception() if warming.done() else None
    if failure is not None:  # a failed self-check or compilation: never serve
        await worker.server.stop(0)
        for lane in worker.batcher.lanes:
            lane.executor.shutdown(wait=False)
        raise failure
    await stopping
    await worker.stop()  # a warm-up still running gives up at its next compilation
    if not warming.done():
        warming.cancel()
    elif not warming.cancelled() and not isinstance(warming.exception(), warmup.WarmUpAborted):
        warming.result()
