"""Assembly of the worker: engines and lanes, the pipeline, its doors, health, reflection,
metrics, security, audit, signals.

Start order (:func:`start`): bind and start the gRPC server with health NOT_SERVING (and
the REST and metrics ports), then compile and self-check off the event loop
(:meth:`Worker.warm_up`), then SERVING. Stop order on SIGTERM or SIGINT
(:meth:`Worker.stop`): health NOT_SERVING while calls are still answered for
``drain_announce_s``; then new calls are refused with UNAVAILABLE and open ones get up to
``drain_grace_s`` to finish before the servers close; then the batcher drains, and only
then are the compute threads released (:meth:`Worker.close`). A start or warm-up that fails
closes everything it opened the same way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from roundtrip.server.codecs.v2_model import Model
from roundtrip.server.config import WorkerConfig
from roundtrip.server.doors import http_server, security, v2_rest
from roundtrip.server.doors.grpc_calls import add_to_server
from roundtrip.server.doors.listeners import (
    PortUnavailable,
    health_only_server,
    listen,
    server_options,
)
from roundtrip.server.doors.roundtrip import RoundTripDoor
from roundtrip.server.doors.stream import StreamDoor
from roundtrip.server.doors.v2_grpc import SERVICE as V2_SERVICE
from roundtrip.server.doors.v2_grpc import V2GrpcDoor
from roundtrip.server.engine import warmup
from roundtrip.server.engine.engine import Engine, EngineStats
from roundtrip.server.ops import heap
from roundtrip.server.ops.metrics import NUMERICS_LABELS, WorkerMetrics
from roundtrip.server.ops.tracing import TraceSettings
from roundtrip.server.parts import pipeline_for, server_info, use_compilation_cache
from roundtrip.server.pipeline.batcher import Batcher
from roundtrip.server.pipeline.pipeline import Pipeline
from roundtrip.v1 import roundtrip_pb2 as pb

__all__ = ["PortUnavailable", "Worker", "serve", "start"]

log = logging.getLogger(__name__)

ROUNDTRIP_SERVICE = pb.DESCRIPTOR.services_by_name["RoundTripService"]

#: The longest a stopping worker waits to send the spans it still holds (a collector that is
#: down would otherwise hold it for the exporter's timeout).
TRACE_FLUSH_S = 2.0


@dataclass(kw_only=True)
class Worker:
    """A running worker: its pipeline, servers, bound ports and health status."""

    config: WorkerConfig
    pipeline: Pipeline
    info: pb.GetServerInfoResponse
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    pauses: heap.Pauses
    port: int = 0
    health_server: grpc.aio.Server | None = None
    http: web.AppRunner | None = None
    http_port: int | None = None
    metrics_port: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    serving: bool = False
    #: The thread that checks and parses large messages off the event loop.
    parser: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")
    )
    #: Warmed up and self-checked (serving, unless stalled or draining).
    warm: bool = False
    watch: asyncio.Task[None] | None = None

    @property
    def metrics(self) -> WorkerMetrics:
        return self.pipeline.metrics

    @property
    def batcher(self) -> Batcher[Engine]:
        return self.pipeline.batcher

    @functools.cached_property
    def model(self) -> Model:
        """The model as V2 describes it, which both V2 doors format."""
        return Model(
            max_batch_items=self.config.max_batch_items,
            max_queue_delay_us=self.config.max_queue_delay_us,
            tally=self.pipeline.metrics.tally,
        )

    def ready(self) -> bool:
        """V2's ServerReady and ModelReady: self-checked and not draining (as health says)."""
        return self.serving

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", ROUNDTRIP_SERVICE.full_name):
            await self.health.set(name, status)
        self.serving = serving

    async def warm_up(self) -> None:
        """Compile and self-check on every lane at once (each on its own compute thread),
        then publish the numerics identity (every lane must give the same bits)."""
        loop = asyncio.get_running_loop()
        lanes = self.batcher.lanes
        pairs = self.config.warmup_pairs()
        steps = {lane.name: warmup.Steps(self.stopping) for lane in lanes}
        async with warmup.heartbeat(steps):  # a line every few seconds: what it is doing
            fingerprints = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        lane.executor, warmup.warm_up, lane.engine, pairs, steps[lane.name]
                    )
                    for lane in lanes
                )
            )
        if len(set(fingerprints)) != 1:
            by_lane = dict(zip([lane.name for lane in lanes], fingerprints, strict=True))
            raise warmup.SelfCheckFailed(f"the compute lanes give different bits: {by_lane}")
        self.pipeline.fingerprint = self.info.numerics.fingerprint = fingerprints[0]
        identity = {name: getattr(self.info.numerics, name) for name in NUMERICS_LABELS}
        self.metrics.observe_numerics(identity)
        collector = heap.settle(self.config.gc_threshold)  # what start-up built stays
        self.warm = True
        await self.set_serving(True)
        log.info("serving", extra={"port": self.port, "numerics": identity, "gc": collector})

    async def watch_progress(self) -> None:
        """Say NOT_SERVING (health, V2's ready routes, ``roundtrip_stalled``, a log line)
        while requests have waited ``max_stall_s`` with no batch running, starting or
        finishing, and SERVING again once the queue moves: a worker that cannot compute must
        not tell its probes it can."""
        limit = self.config.max_stall_s
        every = min(1.0, limit / 4)
        stalled = False
        while True:
            await asyncio.sleep(every)
            waited = self.batcher.stalled_for()
            if (waited > limit) == stalled:
                continue
            stalled = not stalled
            self.metrics.stalled.set(int(stalled))
            budget = self.pipeline.budget
            extra = {
                "waited_s": round(waited, 3),
                "queued": self.batcher.queued,
                "admitted_bytes": budget.in_use,
                "computing_bytes": budget.computing,
            }
            if stalled:
                log.warning("stalled", extra=extra)
            else:
                log.info("moving", extra=extra)
            if self.warm and not self.stopping.is_set():
                await self.set_serving(not stalled)

    async def stop(self) -> bool:
        """Drain in two steps, then close: nothing a door accepted is cut off. Returns
        whether every open call finished within the grace (False: some were cut off).

        1. Announce: health turns NOT_SERVING (probes take the pod out of its
           Services, clients that watch health pick other workers) while calls
           are still answered normally, for ``drain_announce_s``.
        2. Refuse and finish: new calls get UNAVAILABLE (retryable), open
           streams send what they owe and end, and the worker waits up to
           ``drain_grace_s`` for every open call before the servers close.
        """
        config, calls = self.config, self.pipeline.calls
        announce_s = config.drain_announce_s if self.serving else 0.0
        self.serving = False  # V2's ready routes now agree with health
        log.info(
            "draining",
            extra={
                "announce_s": announce_s,
                "grace_s": config.drain_grace_s,
                "inflight": self.metrics.inflight_requests,
            },
        )
        self.stopping.set()  # a warm-up still compiling gives up at its next compilation
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(announce_s)
        # Calls already accepted (and stream messages already read) still reach the
        # batcher and are answered; only new calls are refused.
        calls.refuse_new()
        log.info("refusing", extra={"open_calls": calls.open})
        grace_started = time.monotonic()
        finished = await calls.wait_idle(config.drain_grace_s)
        log.info(
            "drained",
            extra={
                "open_calls": calls.open,
                "waited_s": round(time.monotonic() - grace_started, 3),
                "all_finished": finished,
            },
        )
        await self.close(max(config.drain_grace_s - (time.monotonic() - grace_started), 0.0))
        stats = EngineStats.total(lane.engine.stats for lane in self.batcher.lanes)
        audited, audit_mismatches = self.metrics.audited
        log.info(
            "stopped",
            extra={
                "requests": stats.requests,
                "batches": stats.batches,
                "mean_batch_size": round(stats.requests / max(stats.batches, 1), 2),
                "compilations": stats.compilations,
                "compile_seconds": round(stats.compile_seconds, 3),
                "answered_by_code": self.metrics.answered_by_code(),
                "audited": audited,
                "audit_mismatches": audit_mismatches,
            },
        )
        return finished

    async def close(self, grace: float = 0.0) -> None:
        """Close everything the worker opened, whether it served or not: the servers (open
        calls get ``grace`` seconds), the queue (answered), the compute threads, the audit,
        the collector's watch and the metrics port."""
        self.stopping.set()
        if self.watch is not None:
            self.watch.cancel()
        await self.server.stop(grace)
        if self.http is not None:
            await self.http.cleanup()
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.batcher.drain()
        for lane in self.batcher.lanes:
            lane.executor.shutdown(wait=True)
        if self.batcher.compiler is not None:
            self.batcher.compiler.shutdown(wait=True)
        self.parser.shutdown(wait=True)
        self.pipeline.auditor.stop()
        if self.pipeline.tracing is not None:
            self.pipeline.tracing.close(TRACE_FLUSH_S)
        self.pauses.unwatch()
        self.metrics.close()


async def start(config: WorkerConfig, traces: TraceSettings | None = None) -> Worker:
    """Build and start a worker; health stays NOT_SERVING until :meth:`Worker.warm_up`. A
    port that cannot be bound raises :class:`PortUnavailable`, with nothing left open.
    ``traces``: as the ``OTEL_*`` environment says, unless given."""
    if config.compilation_cache_dir:
        use_compilation_cache(config.compilation_cache_dir)
    traces = traces or TraceSettings.from_environ(os.environ)
    pipeline = pipeline_for(config, traces)
    token = security.token_check(config)
    worker = Worker(
        config=config,
        pipeline=pipeline,
        info=server_info(config, pipeline.budget.limit, len(pipeline.batcher.lanes), traces),
        server=grpc.aio.server(
            options=server_options(config),
            interceptors=security.interceptors(token, pipeline.metrics.refused_unauthenticated),
        ),
        health=health_aio.HealthServicer(),
        pauses=heap.Pauses(),
    )
    try:
        await _open(worker, token)
    except BaseException:
        await worker.close()
        raise
    log.info(
        "listening",
        extra={
            "host": config.host,
            "port": worker.port,
            "metrics_port": worker.metrics_port,
            "http_port": worker.http_port,
            "tls": bool(config.tls_cert_file),
            "mutual_tls": bool(config.tls_client_ca_file),
            "token_required": token is not None,
        },
    )
    return worker


async def _open(worker: Worker, token: security.TokenCheck | None) -> None:
    """Register the doors, bind every port and start serving (NOT_SERVING until warm)."""
    config, pipeline, server = worker.config, worker.pipeline, worker.server
    worker.pauses.watch()
    pipeline.metrics.watch_collector(worker.pauses)
    roundtrip = RoundTripDoor(pipeline, worker.info)
    stream = StreamDoor(
        pipeline,
        max_stream_inflight=config.max_stream_inflight,
        write_timeout_s=config.write_timeout_s,
    )
    methods = {**roundtrip.methods(), **stream.methods()}
    add_to_server(methods, ROUNDTRIP_SERVICE, server, pipeline, worker.parser)
    v2_methods = V2GrpcDoor(pipeline, worker.model, ready=worker.ready).methods()
    add_to_server(v2_methods, V2_SERVICE, server, pipeline, worker.parser)
    health_pb2_grpc.add_HealthServicer_to_server(worker.health, server)
    services = [ROUNDTRIP_SERVICE.full_name, V2_SERVICE.full_name, health.SERVICE_NAME]
    reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    worker.port = listen(server, address, security.server_credentials(config), knob="--port")
    await worker.set_serving(False)
    if config.plaintext_health_port:
        worker.health_server = await health_only_server(
            worker.health, f"{config.host}:{config.plaintext_health_port}"
        )
    try:
        worker.metrics_port = pipeline.metrics.serve(
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
    if config.http_port >= 0:
        door = v2_rest.V2RestDoor(
            pipeline,
            worker.model,
            ready=worker.ready,
            max_body_bytes=config.max_message_bytes,
            max_json_bytes=config.max_json_bytes,
            max_json_output_elements=config.max_json_output_elements,
            read_timeout_s=config.http_read_timeout_s,
            upload_timeout_s=config.http_upload_timeout_s,
            write_timeout_s=config.write_timeout_s,
            token=token,
        )
        try:
            worker.http, worker.http_port = await http_server.start(
                door.application(),
                config.host,
                config.http_port,
                tls=security.ssl_context(config),
                idle_timeout_s=config.http_idle_timeout_s,
                count=lambda code: pipeline.metrics.observe_rpc("HTTP", code, 0.0),
            )
        except OSError as error:
            raise PortUnavailable(
                f"cannot serve HTTP on {config.host}:{config.http_port}: {error.strerror}; "
                "choose another --http-port (0 picks a free one, -1 turns it off)"
            ) from None
    pipeline.batcher.start()
    pipeline.auditor.start()
    if config.max_stall_s > 0:
        worker.watch = asyncio.create_task(worker.watch_progress(), name="progress-watch")
    await server.start()


async def serve(config: WorkerConfig) -> None:
    """Run a worker until SIGINT or SIGTERM, then stop it gracefully; a warm-up that fails
    (a self-check that finds other bits) closes everything and raises."""
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
        stopping.cancel()
        await worker.close()
        raise failure
    await stopping
    await worker.stop()  # a warm-up still running gives up at its next compilation
    if not warming.done():
        warming.cancel()
    elif not warming.cancelled() and not isinstance(warming.exception(), warmup.WarmUpAborted):
        warming.result()
