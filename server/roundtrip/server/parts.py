"""What a worker is built from, given its configuration: a compute lane per local device,
the pipeline over them (byte budget, batcher, limits, audit, metrics), and what
``GetServerInfo`` tells callers. :mod:`~roundtrip.server.app` starts, serves and stops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import grpc
import jax
import numpy as np

from roundtrip.server.config import WorkerConfig
from roundtrip.server.engine.audit import Auditor
from roundtrip.server.engine.engine import Engine
from roundtrip.server.numerics import numerics
from roundtrip.server.ops import trace_export
from roundtrip.server.ops.eventloop import loop_name
from roundtrip.server.ops.metrics import WorkerMetrics
from roundtrip.server.ops.tracing import TraceSettings, Tracing
from roundtrip.server.pipeline import admission
from roundtrip.server.pipeline.batcher import Batcher
from roundtrip.server.pipeline.lanes import Lane
from roundtrip.server.pipeline.pipeline import Pipeline
from roundtrip.server.pipeline.validation import RequestLimits
from roundtrip.server.values import x64_enabled
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.wire.version import __version__

log = logging.getLogger(__name__)


def server_info(
    config: WorkerConfig, budget_limit: int, lanes: int, traces: TraceSettings
) -> pb.GetServerInfoResponse:
    """What GetServerInfo answers: versions, backend, devices, 64-bit mode, limits, traces."""
    return pb.GetServerInfoResponse(
        tracing=pb.TracingSettings(
            enabled=traces.enabled,
            protocol=traces.protocol,
            endpoint=traces.endpoint,
            sampler=traces.sampler,
            sampler_arg=traces.sampler_arg,
        ),
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
            max_inflight_bytes=budget_limit,
            max_batch_items=config.max_batch_items,
            max_param_cache_bytes=config.max_param_cache_bytes,
        ),
    )


def compute_lanes(config: WorkerConfig) -> list[Lane[Engine]]:
    """One lane per local device of JAX's backend, each with its own engine (executables,
    parameter cache: ``max_param_cache_bytes`` shared out evenly) and compute thread."""
    devices = jax.local_devices()
    return [
        Lane(
            Engine(
                max_compiled=config.max_compiled,
                max_batch_size=config.max_batch_size,
                max_param_cache_bytes=config.max_param_cache_bytes // len(devices),
                batched_max_bytes=config.batched_max_bytes,
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


def use_compilation_cache(directory: str) -> None:
    """Point JAX's persistent compilation cache at ``directory`` (every executable is cached)."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tracing_for(settings: TraceSettings, metrics: WorkerMetrics) -> Tracing | None:
    """The worker's tracing as the ``OTEL_*`` environment says (None: off)."""
    started = trace_export.start(settings, version=__version__, count=metrics.count_spans)
    if started is None:
        return None
    tracer, batch_tracer, close, root = started
    return Tracing(tracer, settings, batch_tracer=batch_tracer, close=close, root=root)


def pipeline_for(config: WorkerConfig, traces: TraceSettings | None = None) -> Pipeline:
    """The pipeline: lanes, batcher, byte budget, limits, audit, metrics and tracing, from
    ``config`` (and ``traces``: None, off)."""
    budget = admission.ByteBudget(inflight_bytes(config), caller_share=config.max_caller_share)
    lanes = compute_lanes(config)
    traces = traces or TraceSettings(enabled=False)
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
            "tracing": traces.describe(),
        },
    )
    metrics = WorkerMetrics(max_batch_size=config.max_batch_size)
    tracing = tracing_for(traces, metrics)
    batcher = Batcher(
        lanes,
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=config.max_queue_delay_us,
        max_queue_size=config.max_queue_size,
        budget=budget,
        on_batch=metrics.observe_batch,
        compiler=ThreadPoolExecutor(max_workers=1, thread_name_prefix="jax-compile"),
    )
    metrics.watch_lanes({lane.name: lane.engine for lane in lanes})
    metrics.watch_queue(lambda: batcher.queued)
    metrics.watch_budget(budget)
    pipeline = Pipeline(
        batcher=batcher,
        budget=budget,
        limits=RequestLimits(
            max_x_elements=config.max_x_elements,
            max_features=config.max_features,
            max_param_bytes=config.max_param_bytes,
            max_output_elements=config.max_output_elements,
            max_x_rank=config.max_x_rank,
        ),
        auditor=Auditor(
            config.audit_fraction,
            config.audit_queue_size,
            on_outcome=lambda outcome: metrics.observe_audit(outcome.matched),
            on_skipped=metrics.audit_skipped.inc,
        ),
        metrics=metrics,
        max_batch_items=config.max_batch_items,
        max_answer_bytes=config.max_message_bytes,
        queue_share=config.max_queue_share,
        bulk_queue_share=config.max_bulk_queue_share,
        tracing=tracing,
    )
    if tracing is not None:  # batch spans carry the fingerprint the self-check settles
        tracing.fingerprint = lambda: pipeline.fingerprint
    return pipeline
