"""What ``make bench`` measures, as data: the servers, the scenarios each runs, the ratios.

A scenario is a workload (W1 3 -> 4, W2 64 -> 64, W3 1024 -> 1024), a path into the
server (``unary``, ``batch``, ``stream``, ``v2``, ``rest``; ``perf``: V2 gRPC from Triton's
perf_analyzer; ``callers`` and ``fresh`` are unary calls from asyncio callers with a new
seed per request) and a load (h2load's connections x streams, or the number of callers);
it runs against every server it names.
Add a row here to measure something new; :mod:`bench.run` runs the table.

>>> sorted({scenario.path for scenario in SCENARIOS})
['batch', 'callers', 'fresh', 'perf', 'rest', 'stream', 'unary', 'v2']
>>> all(server in SERVERS for scenario in SCENARIOS for server in scenario.servers)
True
>>> named = {(scenario.name, server) for scenario in SCENARIOS for server in scenario.servers}
>>> all(top in named and bottom in named for _, top, bottom in RATIOS)
True
>>> any("," in name for name in [*SERVERS, *(scenario.name for scenario in SCENARIOS)])
False
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.launch import ServerSpec

WORKER_FLAGS = ("--warmup-shapes", "3:4,64:64,1024:1024")

#: Every server a scenario may name, by the name the report gives it.
SERVERS = {
    "worker": ServerSpec("worker", "worker", WORKER_FLAGS),
    "worker (cache off)": ServerSpec(
        "worker (cache off)", "worker", (*WORKER_FLAGS, "--max-param-cache-bytes", "0")
    ),
    # tracing on (docs/tracing.md): h2load sends no trace context, so the sampler decides
    "worker (traced 1%)": ServerSpec(
        "worker (traced 1%)",
        "worker",
        WORKER_FLAGS,
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
        traced=True,
    ),
    "worker (traced 100%)": ServerSpec(
        "worker (traced 100%)",
        "worker",
        WORKER_FLAGS,
        {"OTEL_TRACES_SAMPLER": "always_on"},
        traced=True,
    ),
    "empty handler": ServerSpec("empty handler", "empty"),
    "naive": ServerSpec("naive", "naive"),
    # RoundTripBatch only: the worker's engine under the thinnest handler (bench.servers)
    "engine only": ServerSpec("engine only", "engine"),
    "MLServer": ServerSpec("MLServer", "mlserver"),
}


@dataclass(frozen=True)
class Scenario:
    """One row of the report: ``path`` into each of ``servers`` with ``workload``, under
    h2load with ``clients`` connections x ``streams`` streams (``callers``/``fresh``:
    ``clients`` asyncio callers; ``stream``: one stream; ``perf``: that many requests
    outstanding)."""

    name: str
    path: str
    workload: str
    servers: tuple[str, ...]
    clients: int = 8
    streams: int = 16
    unit: str = "req/s"
    #: Requests per RoundTripBatch message (path ``batch``).
    items: int = 64

    @property
    def load(self) -> str:
        if self.path in ("callers", "fresh"):
            return f"{self.clients} asyncio callers"
        if self.path == "stream":
            return "one stream"
        if self.path == "perf":
            return f"perf_analyzer, {self.clients * self.streams} outstanding"
        return f"h2load {self.clients} x {self.streams}" + (
            " (HTTP/1.1)" if self.path == "rest" else ""
        )


SCENARIOS = (
    Scenario("W1 unary", "unary", "W1", ("worker",)),
    Scenario(
        "W2 unary",
        "unary",
        "W2",
        ("worker", "empty handler", "naive", "worker (traced 1%)", "worker (traced 100%)"),
    ),
    Scenario("W2 unary (new seed per request)", "callers", "W2", ("worker", "naive"), clients=64),
    Scenario("W2 stream", "stream", "W2", ("worker",), unit="results/s"),
    Scenario(
        "W2 RoundTripBatch x64",
        "batch",
        "W2",
        ("worker", "empty handler", "engine only", "worker (traced 1%)", "worker (traced 100%)"),
        streams=4,
        unit="results/s",
    ),
    # 8 messages of 1,024 outstanding, one per connection
    Scenario(
        "W2 RoundTripBatch x1024",
        "batch",
        "W2",
        ("worker", "empty handler", "engine only"),
        streams=1,
        unit="results/s",
        items=1024,
    ),
    Scenario("W2 V2 gRPC ModelInfer", "v2", "W2", ("worker", "MLServer")),
    Scenario("W2 V2 gRPC ModelInfer (perf_analyzer)", "perf", "W2", ("worker",)),
    Scenario(
        "W2 V2 REST infer (JSON)", "rest", "W2", ("worker", "MLServer"), clients=64, streams=1
    ),
    Scenario(
        "W3 unary (one seed repeated)",
        "unary",
        "W3",
        ("worker", "worker (cache off)", "naive"),
        streams=4,
    ),
    Scenario(
        "W3 unary (fresh seed per request)",
        "fresh",
        "W3",
        ("worker", "worker (cache off)"),
        clients=16,
    ),
)

#: The ratios the report gives: (name, (scenario, server) over (scenario, server)).
RATIOS = (
    ("W2 unary: worker / empty handler", ("W2 unary", "worker"), ("W2 unary", "empty handler")),
    (
        "W2 unary: traced 1% / not traced",
        ("W2 unary", "worker (traced 1%)"),
        ("W2 unary", "worker"),
    ),
    (
        "W2 unary: traced 100% / not traced",
        ("W2 unary", "worker (traced 100%)"),
        ("W2 unary", "worker"),
    ),
    (
        "W2 RoundTripBatch x64: traced 1% / not traced",
        ("W2 RoundTripBatch x64", "worker (traced 1%)"),
        ("W2 RoundTripBatch x64", "worker"),
    ),
    (
        "W2 RoundTripBatch x64: traced 100% / not traced",
        ("W2 RoundTripBatch x64", "worker (traced 100%)"),
        ("W2 RoundTripBatch x64", "worker"),
    ),
    (
        "W2 RoundTripBatch x64 results/s / empty handler's unary req/s",
        ("W2 RoundTripBatch x64", "worker"),
        ("W2 unary", "empty handler"),
    ),
    (
        "W2 RoundTripBatch x1024 results/s / empty handler's unary req/s",
        ("W2 RoundTripBatch x1024", "worker"),
        ("W2 unary", "empty handler"),
    ),
    (
        "engine only: RoundTripBatch x64 results/s / empty handler's unary req/s",
        ("W2 RoundTripBatch x64", "engine only"),
        ("W2 unary", "empty handler"),
    ),
    (
        "engine only: RoundTripBatch x1024 results/s / empty handler's unary req/s",
        ("W2 RoundTripBatch x1024", "engine only"),
        ("W2 unary", "empty handler"),
    ),
    (
        "empty handler: RoundTripBatch x64 results/s / unary req/s",
        ("W2 RoundTripBatch x64", "empty handler"),
        ("W2 unary", "empty handler"),
    ),
    (
        "empty handler: RoundTripBatch x1024 results/s / unary req/s",
        ("W2 RoundTripBatch x1024", "empty handler"),
        ("W2 unary", "empty handler"),
    ),
    ("W2 unary: worker / naive", ("W2 unary", "worker"), ("W2 unary", "naive")),
    (
        "W3 one seed repeated: worker / naive",
        ("W3 unary (one seed repeated)", "worker"),
        ("W3 unary (one seed repeated)", "naive"),
    ),
    (
        "W3 one seed repeated: cache on / off",
        ("W3 unary (one seed repeated)", "worker"),
        ("W3 unary (one seed repeated)", "worker (cache off)"),
    ),
    (
        "W3 fresh seeds: cache on / off",
        ("W3 unary (fresh seed per request)", "worker"),
        ("W3 unary (fresh seed per request)", "worker (cache off)"),
    ),
    (
        "V2 gRPC / RoundTrip, worker",
        ("W2 V2 gRPC ModelInfer", "worker"),
        ("W2 unary", "worker"),
    ),
    (
        "V2 gRPC: worker / MLServer",
        ("W2 V2 gRPC ModelInfer", "worker"),
        ("W2 V2 gRPC ModelInfer", "MLServer"),
    ),
    (
        "V2 REST: worker / MLServer",
        ("W2 V2 REST infer (JSON)", "worker"),
        ("W2 V2 REST infer (JSON)", "MLServer"),
    ),
)
