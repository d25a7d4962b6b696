"""Where a W2 unary call's time goes in the worker: the worker with one part taken out.

    python -m bench.ladder --rounds 3 --duration 8   # -> docs/bench/ladder.json

Side by side, every server started afresh, the order flipped every round, h2load 8
connections x 16 streams replaying W2's body (issue 10's unary target):

* ``empty``: the plain grpc.aio handler answering a constant (the ceiling);
* ``worker``: the worker as it ships;
* ``no compute``: the worker, but the compute thread hands back the answer it computed
  for the same request before, without JAX: the batcher and the hand-off to the
  lane's thread and back run as shipped;
* ``no hand-off``: the worker, but each batch is answered from that memo in its own task
  on the event loop: the batcher as shipped, no lane's thread, no compute (its batches
  hold one request: each is answered before the next request is queued);
* ``no batcher``: the worker, but a request seen before is answered from that memo on
  the event loop, without the batcher or the compute thread: parsing, admission,
  validation, metrics, the audit and encoding run as shipped (the handler path alone);
* ``one suspension``: ``no batcher``, but the memo's answer comes back through a future
  resolved on the loop's next turn, so the handler suspends once, as a queued request
  does: the price of waiting at all, without a batcher or a thread;
* ``process lane``: the worker, but each batch is computed by an engine in a child
  process (pickled over a pipe, its answer read by the event loop as one more file
  descriptor) instead of on the lane's thread: the lead for the unary target, tried
  before building it.

Each altered worker computes a request's first answer through its engine, so the body's
answer is checked against the eager reference on every server before its load. The
memo is a bench device only: it is never in the worker.

For every server that runs batches, the report also reads the worker's own metrics
around each load (``lane``): batches, requests per batch, and the lane's seconds per
batch (``roundtrip_batch_compute_seconds``: from the hand-off to the lane until its
answers are back on the loop), and how much of the load the lane was busy
(``occupancy``: those seconds over the load's). ``alone`` is the same W2 batch, of the
worker's median size, run through a warmed engine in this process with nothing else
running: the lane's own work, without the event loop beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import multiprocessing
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from bench.run import OUT, cases, check_body, h2load, machine, scrape, server
from conftest import metric_value
from roundtrip.server import batcher, warmup
from roundtrip.server.batcher import Batcher, Lane, Ticket
from roundtrip.server.config import WorkerConfig
from roundtrip.server.engine import Engine, RoundTripInput
from roundtrip.server.validation import decode
from roundtrip.v1 import roundtrip_pb2 as pb

ALTERED = ("no compute", "no hand-off", "process lane", "no batcher", "one suspension")
WORKER_FLAGS = ("--warmup-shapes", "64:64")


def _key(item: RoundTripInput) -> tuple[Any, ...]:
    return (item.seed, item.x.dtype.str, item.x.shape, item.x.tobytes(), item.features)


def _remembered(
    compute: Callable[[list[RoundTripInput]], list[Any]], memo: dict[tuple[Any, ...], Any]
) -> Callable[[list[RoundTripInput]], list[Any]]:
    """``compute`` for a batch with a request not seen before, else the answers remembered."""

    def known_or_computed(items: list[RoundTripInput]) -> list[Any]:
        known = [memo.get(_key(item)) for item in items]
        if all(answer is not None for answer in known):
            return known
        outcomes = compute(items)
        for item, outcome in zip(items, outcomes, strict=True):
            if not isinstance(outcome, Exception):  # an error is never remembered
                memo[_key(item)] = outcome
        return outcomes

    return known_or_computed


def w2_engine() -> Engine:
    """An engine with the worker's default settings, warmed up for W2."""
    config = WorkerConfig()
    engine = Engine(
        max_compiled=config.max_compiled,
        max_batch_size=config.max_batch_size,
        max_param_cache_bytes=config.max_param_cache_bytes,
    )
    warmup.warm_up(engine, [(64, 64)])
    return engine


def _lane_process(connection: Connection) -> None:
    """The child of ``process lane``: :func:`w2_engine` answering pickled batches as the
    lane's thread would (``batcher.compute``), until the worker goes away."""
    engine = w2_engine()
    try:
        while True:
            items = pickle.loads(connection.recv_bytes())
            connection.send_bytes(pickle.dumps(batcher.compute(engine, items)))
    except EOFError:
        return


def _in_a_process() -> None:
    """``process lane``: each batch goes to :func:`_lane_process` and back over a pipe."""
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    spawn.Process(target=_lane_process, args=(theirs,), daemon=True).start()
    replies: collections.deque[asyncio.Future[bytes]] = collections.deque()

    def replied() -> None:
        replies.popleft().set_result(ours.recv_bytes())

    async def in_child(self: Batcher, lane: Lane, batch: list[Ticket]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if not replies:  # one batch at a time: (re)install the reader for this loop
            loop.add_reader(ours.fileno(), replied)
        reply: asyncio.Future[bytes] = loop.create_future()
        replies.append(reply)
        ours.send_bytes(pickle.dumps([pending.item for pending in batch]))
        return pickle.loads(await reply)  # type: ignore[no-any-return]

    Batcher._outcomes = in_child  # type: ignore[method-assign]


def alter(part: str) -> None:
    """Take ``part`` out of the worker this process is about to run."""
    memo: dict[tuple[Any, ...], Any] = {}
    if part == "process lane":
        _in_a_process()
    elif part == "no hand-off":

        async def on_the_loop(self: Batcher, lane: Lane, batch: list[Ticket]) -> list[Any]:
            compute = functools.partial(batcher.compute, lane.engine)
            return _remembered(compute, memo)([pending.item for pending in batch])

        Batcher._outcomes = on_the_loop  # type: ignore[method-assign]
    elif part == "no compute":
        compute = batcher.compute

        def remembered(engine: Any, items: list[RoundTripInput]) -> Any:
            return _remembered(functools.partial(compute, engine), memo)(items)

        batcher.compute = remembered
    else:
        submit = Batcher.submit
        suspend = part == "one suspension"

        async def answered_before(self: Batcher, item: RoundTripInput, **kwargs: Any) -> Any:
            answer = memo.get(_key(item))
            if answer is None:
                answer = memo[_key(item)] = await submit(self, item, **kwargs)
            elif suspend:
                later: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                later.get_loop().call_soon(later.set_result, answer)
                answer = await later
            return answer

        Batcher.submit = answered_before  # type: ignore[method-assign]


LANE_SAMPLES = {
    "batches": "roundtrip_batch_size_count",
    "requests": "roundtrip_batch_size_sum",
    "lane_seconds": "roundtrip_batch_compute_seconds_sum",
}


def lane_reading(before: str, after: str, seconds: float) -> dict[str, float] | None:
    """What the lane did between two scrapes of a load ``seconds`` long (None: no batch ran)."""
    done = {
        name: metric_value(after, sample, 0.0) - metric_value(before, sample, 0.0)
        for name, sample in LANE_SAMPLES.items()
    }
    if not done["batches"]:
        return None
    return {
        "batches": done["batches"],
        "requests_per_batch": round(done["requests"] / done["batches"], 2),
        "ms_per_batch": round(done["lane_seconds"] / done["batches"] * 1e3, 3),
        "occupancy": round(done["lane_seconds"] / seconds, 3),
    }


def alone(request: pb.RoundTripRequest, size: int, repeats: int = 300) -> float:
    """Milliseconds one W2 batch of ``size`` takes through :func:`w2_engine`, in this process
    with nothing else running (the median of ``repeats``, the first tenth left out)."""
    engine = w2_engine()
    items = [decode(request)] * size
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        batcher.compute(engine, items)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times[repeats // 10 :]) * 1e3, 3)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:  # serve PART -- worker flags
        from roundtrip.server.__main__ import main as worker

        alter(args[1])
        sys.exit(worker(args[3:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    options = parser.parse_args(args)
    w2 = cases(64, 64, 1, check=True)[0]
    kinds = ["empty", "worker", *ALTERED]
    runs: dict[str, list[float]] = {}
    lanes: dict[str, list[dict[str, float]]] = {}
    for round_ in range(options.rounds):
        for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
            if kind == "empty":
                started = server("empty")
            elif kind == "worker":
                started = server("worker", *WORKER_FLAGS)
            else:
                launcher = ("-m", "bench.ladder", "serve", kind, "--")
                started = server("worker", *WORKER_FLAGS, launcher=launcher)
            reading = None
            with started as port:
                if kind != "empty":
                    check_body(port, w2)
                    before = scrape(port)
                rps = h2load(port, w2.request, duration=options.duration, clients=8, streams=16)
                if kind != "empty":
                    reading = lane_reading(before, scrape(port), options.duration)
            if reading is not None:
                lanes.setdefault(kind, []).append(reading)
            runs.setdefault(kind, []).append(rps["rps"])
            print(kind, round(rps["rps"]), reading or "", flush=True)
    medians = {kind: statistics.median(values) for kind, values in runs.items()}
    sizes = [reading["requests_per_batch"] for reading in lanes["worker"]]
    report = {
        "runs": runs,
        "medians": medians,
        "of the empty handler": {
            kind: round(rps / medians["empty"], 3) for kind, rps in medians.items()
        },
        "lane": lanes,
        "worker batch alone, ms": alone(w2.request, round(statistics.median(sizes))),
        "worker median requests per batch": statistics.median(sizes),
        "machine": machine("h2load on the same cores"),
        "rounds": options.rounds,
        "duration_s": options.duration,
    }
    (OUT / "ladder.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["of the empty handler"], indent=2))


if __name__ == "__main__":
    main()
