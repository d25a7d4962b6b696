"""What Python's garbage collector costs the worker under load, with ``gc_threshold`` and
without it.

    python -m bench.collector --rounds 3 --duration 8   # -> docs/bench/collector.json

Side by side, each worker started afresh, the order flipped every round: the worker as
it ships (start-up heap frozen after warm-up, young generation every 10,000 allocations)
and with ``--gc-threshold 0`` (Python's collector as it comes). h2load drives W2's body
(8 connections x 16 streams, as issue 10's unary target); the body's answer is checked
against the eager reference first. Each load's collector time is read from the worker's
``roundtrip_gc_seconds_total`` and ``roundtrip_gc_collections_total``, before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench.run import OUT, cases, check_body, h2load, machine, scrape, server
from conftest import metric_value
from roundtrip.server.heap import GENERATIONS

SETTINGS = {"shipped": (), "gc_threshold 0": ("--gc-threshold", "0")}


def collector(port: int) -> dict[str, float]:
    """The worker's collector seconds and passes so far, summed over generations."""
    text = scrape(port)
    return {
        name: sum(
            metric_value(text, f'roundtrip_gc_{name}_total{{generation="{generation}"}}')
            for generation in GENERATIONS
        )
        for name in ("seconds", "collections")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    options = parser.parse_args()
    w2 = cases(64, 64, 1, check=True)[0]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for round_ in range(options.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            with server("worker", "--warmup-shapes", "64:64", *SETTINGS[name]) as port:
                check_body(port, w2)
                before = collector(port)
                load = h2load(port, w2.request, duration=options.duration, clients=8, streams=16)
                after = collector(port)
            run = {
                "rps": load["rps"],
                "gc_seconds": round(after["seconds"] - before["seconds"], 4),
                "gc_collections": after["collections"] - before["collections"],
            }
            runs[name].append(run)
            print(name, run, flush=True)
    medians = {
        name: {key: statistics.median(run[key] for run in values) for key in values[0]}
        for name, values in runs.items()
    }
    report = {
        "runs": runs,
        "medians": medians,
        "machine": machine("h2load on the same cores"),
        "load_s": options.duration + 2,  # h2load's warm-up time counts for the collector
        "rounds": options.rounds,
    }
    (OUT / "collector.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
