"""``make bench``: every scenario of :mod:`bench.scenarios` against its servers, in rounds.

    make bench                                  # 3 rounds of 10 s loads -> docs/bench/results.json
    python -m bench.run --quick                 # 1 round of 3 s loads, a smoke run
    python -m bench.run --baseline HEAD~1       # this tree's worker beside HEAD~1's, alternating
    python -m bench.run --baseline HEAD~1 --servers "worker (cache off)"  # its scenarios
    python -m bench.run --servers worker,empty\\ handler --scenarios "W2 unary"

Each round starts every server afresh, in an order that flips every round, and runs each of
its scenarios once: every body's answer is checked bit for bit against the eager reference
before its load, every answer of the asyncio loads as it comes, and the worker's own
counters around each load must show no status but OK. A figure counts OK answers only, and
is the median over the rounds; a ratio is of two medians measured side by side in the same
rounds.

``--baseline COMMIT`` runs a worker's scenarios (``worker``, or the one ``--servers``
names) on this tree and on COMMIT's (a ``git worktree``), alternating, and reports
this / baseline per scenario: the check that a change cost nothing. Its report goes to
``.bench/`` unless ``--out`` says where.

The report is one JSON file and one table: ``docs/bench/results.json`` and the table in
docs/benchmarks.md between its markers (a test keeps the two equal).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import checks, harness, launch, loads
from bench.checks import Bodies
from bench.harness import OUT
from bench.launch import Launched, ServerSpec
from bench.report import ratios, table, write_page_table
from bench.scenarios import SCENARIOS, SERVERS, Scenario
from support.workers import ROOT


def ok_rate(rate: float, ok: int, not_ok: int) -> float:
    """A load's ``rate`` counting OK answers only, from the worker's own counts of the
    load's answers (h2load counts a gRPC error, an HTTP 200, as a success); a server that
    counts nothing (``ok`` and ``not_ok`` 0: not the worker) keeps its rate.

    >>> ok_rate(230.0, ok=2640, not_ok=360), ok_rate(230.0, ok=0, not_ok=0)
    (202.4, 230.0)
    """
    return rate * ok / (ok + not_ok) if ok + not_ok else rate


class Run:
    """One run's figures and checks, as the scenarios record them."""

    def __init__(self, duration: int) -> None:
        self.duration = duration
        self.figures: dict[str, dict[str, list[float]]] = {}
        self.checks: Counter[str] = Counter()
        self.next_fresh_seed = 10**9

    def measure(
        self, scenario: Scenario, spec: ServerSpec, launched: Launched, bodies: Bodies
    ) -> None:
        """Run ``scenario`` against ``launched`` and record its figure and checks.

        h2load ends a load by resetting the calls it has open: the worker counts those as
        CANCELLED, at most one per stream h2load keeps open (times the items of a batch).
        Any other status, or more cancels than that, counts as not OK, and the figure is
        of OK answers only: h2load counts a gRPC error (an HTTP 200) as a success, so its
        rate is scaled by the share of the worker's answers that were OK.
        """
        before = launch.codes(launched)
        ran = LOADS[scenario.path](Load(self, scenario, spec, launched, bodies))
        if ran.result is not None:
            self.checks["mismatches"] += int(ran.result["mismatches"])
            self.checks["call errors"] += int(ran.result["errors"])
        value, checked = ran.value, ran.checked
        launch.settled(launched)  # the load's last calls counted in its own figures
        codes = launch.codes(launched) - before
        ok = codes.pop("OK", 0)
        if 0 < codes["CANCELLED"] <= scenario.clients * scenario.streams * ran.items:
            self.checks["cancelled as a load ended"] += codes.pop("CANCELLED")
        not_ok = codes.total()
        value = ok_rate(value, ok, not_ok)
        self.checks["answers checked"] += checked
        self.checks["not OK"] += not_ok
        self.figures.setdefault(scenario.name, {}).setdefault(spec.name, []).append(value)
        print(
            f"{scenario.name}, {spec.name}: {value:,.0f} {scenario.unit}", dict(codes), flush=True
        )

    def medians(self) -> dict[str, dict[str, float]]:
        return {
            name: {server: statistics.median(values) for server, values in by_server.items()}
            for name, by_server in self.figures.items()
        }


@dataclass(frozen=True)
class Load:
    """One scenario's load about to run: the rounds it is part of, the server, the bodies."""

    run: Run
    scenario: Scenario
    spec: ServerSpec
    launched: Launched
    bodies: Bodies

    @property
    def h2load(self) -> dict[str, Any]:
        scenario = self.scenario
        duration = self.run.duration
        return {"duration": duration, "clients": scenario.clients, "streams": scenario.streams}


@dataclass(frozen=True)
class Ran:
    """A load's figure, how many answers it compared, and the asyncio callers' own tally."""

    value: float
    checked: int
    result: dict[str, float] | None = None
    #: Requests per call: the calls h2load cancels as a load ends are counted in items.
    items: int = 1


def _unary(load: Load) -> Ran:
    body = load.bodies.one(load.scenario.workload)
    if load.spec.computes:
        checks.check_unary(load.launched.port, body)
    rps = loads.h2load_grpc(load.launched.port, checks.ROUNDTRIP, body.request, **load.h2load)
    return Ran(rps["rps"], 1 if load.spec.computes else 0)


def _batch(load: Load) -> Ran:
    batch = load.bodies.batch(load.scenario.workload, load.scenario.items)
    if load.spec.computes:
        checks.check_batch(load.launched.port, batch)
    rps = loads.h2load_grpc(
        load.launched.port, checks.ROUNDTRIP_BATCH, batch.request, **load.h2load
    )
    checked = len(batch.items) if load.spec.computes else 0
    return Ran(rps["rps"] * len(batch.items), checked, items=len(batch.items))


def _v2(load: Load) -> Ran:
    body = load.bodies.one(load.scenario.workload)
    checks.check_v2(load.launched.port, body)
    return Ran(
        loads.h2load_grpc(load.launched.port, checks.MODEL_INFER, body.v2, **load.h2load)["rps"], 1
    )


def _perf(load: Load) -> Ran:
    """perf_analyzer over V2 gRPC."""
    body = load.bodies.one(load.scenario.workload)
    checks.check_v2(load.launched.port, body)
    concurrency = load.scenario.clients * load.scenario.streams
    perf = loads.perf_analyzer(
        load.launched.port, "grpc", body, duration=load.run.duration, concurrency=concurrency
    )
    return Ran(perf["rps"], 1)


def _rest(load: Load) -> Ran:
    body = load.bodies.one(load.scenario.workload)
    checks.check_json(load.launched.http_port, body)
    url = f"http://127.0.0.1:{load.launched.http_port}{checks.INFER_PATH}"
    headers = ["content-type: application/json"]
    return Ran(loads.h2load(url, body.json, headers, h1=True, **load.h2load)["rps"], 1)


def _stream(load: Load) -> Ran:
    bodies = load.bodies.many(load.scenario.workload)
    result = loads.stream_load(load.launched.port, bodies, count=3000 * load.run.duration)
    return Ran(result["rps"], int(result["rps"] * load.run.duration), result)


def _callers(load: Load) -> Ran:
    result = loads.callers(
        load.launched.port,
        load.bodies.many(load.scenario.workload),
        concurrency=load.scenario.clients,
        duration=load.run.duration,
    )
    return Ran(result["rps"], int(result["rps"] * load.run.duration), result)


def _fresh(load: Load) -> Ran:
    run = load.run
    result = loads.fresh_seed_callers(
        load.launched.port,
        load.scenario.workload,
        run.next_fresh_seed,
        duration=run.duration,
        concurrency=load.scenario.clients,
    )
    run.next_fresh_seed += 10**6
    return Ran(result["rps"], 24, result)


#: How each scenario path is loaded: the one place a path is switched on.
LOADS: dict[str, Callable[[Load], Ran]] = {
    "unary": _unary,
    "batch": _batch,
    "v2": _v2,
    "perf": _perf,
    "rest": _rest,
    "stream": _stream,
    "callers": _callers,
    "fresh": _fresh,
}


def run_rounds(
    specs: list[ServerSpec],
    scenarios: Iterable[Scenario],
    *,
    rounds: int,
    duration: int,
    runs_on: Callable[[Scenario, ServerSpec], bool],
    bodies_for: Callable[[ServerSpec], Bodies] | None = None,
) -> Run:
    """Every server of ``specs``, started afresh each round (the order flipped every other
    round), through each scenario that ``runs_on`` it; ``bodies_for`` gives a server the
    bodies (and the device of their references) it is checked with."""
    shared = Bodies()
    run = Run(duration)
    scenarios = list(scenarios)
    for round_ in range(rounds):
        for spec in specs if round_ % 2 == 0 else specs[::-1]:
            mine = [scenario for scenario in scenarios if runs_on(scenario, spec)]
            if not mine:
                continue
            bodies = bodies_for(spec) if bodies_for is not None else shared
            with launch.launched(spec) as launched, bodies.on_device():
                for scenario in mine:
                    try:
                        run.measure(scenario, spec, launched, bodies)
                    except checks.Mismatch as error:
                        run.checks["mismatches"] += 1
                        print(f"MISMATCH in {scenario.name} on {spec.name}: {error}", flush=True)
    return run


def report(run: Run, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    medians = run.medians()
    return {
        "started": args.started,
        "machine": harness.machine("h2load and the Python callers on the same cores")
        | {"engine, W2 batch of 16, ms": harness.engine_batch_ms()},
        "rounds": args.rounds,
        "duration_s": args.duration,
        "scenarios": {
            scenario.name: {
                "path": scenario.path,
                "workload": scenario.workload,
                "load": scenario.load,
                "unit": scenario.unit,
                "runs": run.figures[scenario.name],
                "medians": medians[scenario.name],
            }
            for scenario in SCENARIOS
            if scenario.name in run.figures
        },
        "checks": dict(run.checks),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s loads")
    parser.add_argument("--baseline", metavar="COMMIT", help="beside this commit's worker")
    parser.add_argument("--servers", help="comma-separated server names (default: all)")
    parser.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    parser.add_argument("--out", type=Path, help="the JSON report's path")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 3
    args.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    scenarios = [
        scenario
        for scenario in SCENARIOS
        if not args.scenarios or scenario.name in args.scenarios.split(",")
    ]
    if args.baseline:
        return side_by_side(args, scenarios)
    names = args.servers.split(",") if args.servers else list(SERVERS)
    run = run_rounds(
        [SERVERS[name] for name in names],
        scenarios,
        rounds=args.rounds,
        duration=args.duration,
        runs_on=lambda scenario, spec: spec.name in scenario.servers,
    )
    results = report(run, args, {})
    results["ratios"] = ratios(run.medians())
    rendered = table(results)
    print(rendered)
    out = args.out or OUT / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.out is None and not args.servers and not args.scenarios and not args.quick:
        write_page_table(rendered)
    return 1 if run.checks["mismatches"] or run.checks["not OK"] else 0


def side_by_side(args: argparse.Namespace, scenarios: list[Scenario]) -> int:
    """A worker's scenarios (``--servers``: one worker's name, ``worker`` by default) on
    this tree and on ``args.baseline``'s, alternating."""
    ours = SERVERS[args.servers or "worker"]
    if ours.kind != "worker":
        raise SystemExit(f"--baseline compares a worker, not {ours.name!r}")
    with launch.worktree(args.baseline) as tree:
        theirs = ServerSpec(f"{ours.name} at {args.baseline}", "worker", ours.flags, tree=tree)
        run = run_rounds(
            [ours, theirs],
            scenarios,
            rounds=args.rounds,
            duration=args.duration,
            runs_on=lambda scenario, spec: ours.name in scenario.servers,
        )
    medians = run.medians()
    compared = {
        name: round(by_server[ours.name] / by_server[theirs.name], 3)
        for name, by_server in medians.items()
        if by_server.get(theirs.name)
    }
    results = report(run, args, {"baseline": args.baseline, "this / baseline": compared})
    print(table(results | {"ratios": {f"{k}: this / baseline": v for k, v in compared.items()}}))
    out = args.out or ROOT / ".bench" / f"side-by-side-{args.baseline.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"report: {out}")
    return 1 if run.checks["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
