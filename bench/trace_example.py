"""A batched call as a collector receives it, for ``docs/operations.md``:

    python -m bench.trace_example

Starts a worker (``max_queue_delay_us`` 20,000) exporting to an OTLP collector on loopback
(:mod:`support.otlp`), sends four ``RoundTrip`` calls at once, each under its own caller's
trace, and prints what arrived: each caller's trace (its call and request spans) and the
batch span, in a trace of its own, linked to the four requests.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np

from roundtrip.client import AsyncRoundTripClient
from support.otlp import Collector, Received
from support.polling import wait_for
from support.workers import InProcessWorker

PARENT = "00f067aa0ba902b7"
SHOWN = (
    "rpc.grpc.status_code",
    "rpc.request.size",
    "rpc.response.size",
    "roundtrip.held_bytes",
    "roundtrip.queue_wait_seconds",
    "roundtrip.batch.size",
    "roundtrip.lane",
    "roundtrip.signature",
    "roundtrip.compilations",
    "roundtrip.param_cache_hits",
    "roundtrip.param_cache_misses",
)


def line(span: Received, indent: str) -> str:
    took = (span.span.end_time_unix_nano - span.span.start_time_unix_nano) / 1e6
    shown = {k: v for k, v in span.attributes.items() if k in SHOWN}
    if "roundtrip.queue_wait_seconds" in shown:
        shown["roundtrip.queue_wait_seconds"] = round(shown["roundtrip.queue_wait_seconds"], 4)
    links = f" links={len(span.links)}" if span.links else ""
    events = f" events={span.events}" if span.events else ""
    return f"{indent}{span.name} [{span.status}] {took:.2f} ms{links}{events} {shown}"


def main() -> None:
    traces = [f"{index + 1:032x}" for index in range(4)]
    with Collector() as collector:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.grpc_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        os.environ.update(env)
        worker = InProcessWorker("--max-queue-delay-us", "20000")
        try:
            worker.wait_serving()

            async def at_once() -> None:
                async with AsyncRoundTripClient(worker.target) as client:
                    x = np.linspace(-1, 1, 64, dtype=np.float32)
                    await asyncio.gather(
                        *(
                            client.round_trip(
                                seed, x, 64, metadata=[("traceparent", f"00-{t}-{PARENT}-01")]
                            )
                            for seed, t in enumerate(traces)
                        )
                    )

            asyncio.run(at_once())
            wait_for(lambda: len(collector.spans("roundtrip.batch")) >= 1, "the batch span")
            wait_for(lambda: len(collector.spans("roundtrip.request")) >= 4, "request spans")
        finally:
            worker.kill()
            for name in env:
                os.environ.pop(name)
    for trace_id in traces:
        print(f"trace {trace_id} (the caller's span {PARENT})")
        spans = list(collector.trace(trace_id))
        for call in (s for s in spans if s.parent_id == PARENT):
            print(line(call, "  "))
            for request in (s for s in spans if s.parent_id == call.span_id):
                print(line(request, "    "))
    for batch in collector.spans("roundtrip.batch"):
        linked = sorted(trace_id[-4:] for trace_id, _ in batch.links)
        print(f"trace {batch.trace_id} (its own), linked to the requests of traces ...{linked}")
        print(line(batch, "  "))


if __name__ == "__main__":
    main()
