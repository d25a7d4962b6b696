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
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import OUT, BatchBody, Body, Launched, ServerSpec
from bench.scenarios import RATIOS, SCENARIOS, SERVERS, Scenario
from support.workers import ROOT

BENCHMARKS_PAGE = ROOT / "docs" / "benchmarks.md"
TABLE_START = "<!-- make bench writes the table below from docs/bench/results.json -->"
TABLE_END = "<!-- end of make bench's table -->"


class Bodies:
    """Every body the scenarios send, with its reference answer, built once per run; on
    ``device`` (a JAX device: the reference runs on the backend of the worker it checks)."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self._made: dict[Any, Any] = {}

    def on_device(self) -> AbstractContextManager[Any]:
        """Where references run while this body set is in use."""
        if self.device is None:
            return nullcontext()
        import jax

        return jax.default_device(self.device)

    def one(self, workload: str) -> Body:
        return self._get(("one", workload), lambda: harness.workload_body(workload))

    def many(self, workload: str, count: int = 64) -> list[Body]:
        return self._get(
            ("many", workload),
            lambda: [harness.workload_body(workload, index) for index in range(count)],
        )

    def batch(self, workload: str) -> BatchBody:
        return self._get(("batch", workload), lambda: BatchBody(workload))

    def _get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


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
        before = harness.codes(launched)
        value, checked = self._load(scenario, spec, launched, bodies)
        harness.settled(launched)  # the load's last calls counted in its own figures
        codes = harness.codes(launched) - before
        ok = codes.pop("OK", 0)
        items = len(bodies.batch(scenario.workload).items) if scenario.path == "batch" else 1
        if 0 < codes["CANCELLED"] <= scenario.clients * scenario.streams * items:
            self.checks["cancelled as a load ended"] += codes.pop("CANCELLED")
        not_ok = codes.total()
        value = ok_rate(value, ok, not_ok)
        self.checks["answers checked"] += checked
        self.checks["not OK"] += not_ok
        self.figures.setdefault(scenario.name, {}).setdefault(spec.name, []).append(value)
        print(
            f"{scenario.name}, {spec.name}: {value:,.0f} {scenario.unit}", dict(codes), flush=True
        )

    def _load(
        self, scenario: Scenario, spec: ServerSpec, launched: Launched, bodies: Bodies
    ) -> tuple[float, int]:
        """The scenario's figure on ``launched``, and how many answers were compared (the
        empty handler's constant answer is not the computation's: it is not checked)."""
        port = launched.port
        load = {"duration": self.duration, "clients": scenario.clients, "streams": scenario.streams}
        body = bodies.one(scenario.workload)
        if scenario.path == "unary":
            rps = harness.h2load_grpc
            if not spec.computes:
                return rps(port, harness.ROUNDTRIP, body.request, **load)["rps"], 0
            harness.check_unary(port, body)
            return rps(port, harness.ROUNDTRIP, body.request, **load)["rps"], 1
        if scenario.path == "batch":
            batch = bodies.batch(scenario.workload)
            harness.check_batch(port, batch)
            rps = harness.h2load_grpc(port, harness.ROUNDTRIP_BATCH, batch.request, **load)["rps"]
            return rps * len(batch.items), len(batch.items)
        if scenario.path == "v2":
            harness.check_v2(port, body)
            return harness.h2load_grpc(port, harness.MODEL_INFER, body.v2, **load)["rps"], 1
        if scenario.path == "perf":  # perf_analyzer over V2 gRPC
            harness.check_v2(port, body)
            concurrency = scenario.clients * scenario.streams
            perf = harness.perf_analyzer(
                port, "grpc", body, duration=self.duration, concurrency=concurrency
            )
            return perf["rps"], 1
        if scenario.path == "rest":
            harness.check_json(launched.http_port, body)
            url = f"http://127.0.0.1:{launched.http_port}{harness.INFER_PATH}"
            headers = ["content-type: application/json"]
            return harness.h2load(url, body.json, headers, h1=True, **load)["rps"], 1
        if scenario.path == "stream":
            result = harness.stream_load(
                port, bodies.many(scenario.workload), count=3000 * self.duration
            )
        elif scenario.path == "callers":
            result = harness.callers(
                port,
                bodies.many(scenario.workload),
                concurrency=scenario.clients,
                duration=self.duration,
            )
        else:  # fresh
            result = harness.fresh_seed_callers(
                port,
                scenario.workload,
                self.next_fresh_seed,
                duration=self.duration,
                concurrency=scenario.clients,
            )
            self.next_fresh_seed += 10**6
        self.checks["mismatches"] += int(result["mismatches"])
        self.checks["call errors"] += int(result["errors"])
        checked = 24 if scenario.path == "fresh" else int(result["rps"] * self.duration)
        return result["rps"], checked

    def medians(self) -> dict[str, dict[str, float]]:
        return {
            name: {server: statistics.median(values) for server, values in by_server.items()}
            for name, by_server in self.figures.items()
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
            with harness.launched(spec) as launched, bodies.on_device():
                for scenario in mine:
                    try:
                        run.measure(scenario, spec, launched, bodies)
                    except harness.Mismatch as error:
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


def ratios(medians: dict[str, dict[str, float]]) -> dict[str, float]:
    """The :data:`~bench.scenarios.RATIOS` whose two figures this run has."""
    found = {}
    for name, (top_scenario, top_server), (bottom_scenario, bottom_server) in RATIOS:
        top = medians.get(top_scenario, {}).get(top_server)
        bottom = medians.get(bottom_scenario, {}).get(bottom_server)
        if top is not None and bottom:
            found[name] = round(top / bottom, 2)
    return found


def table(results: dict[str, Any]) -> str:
    """The report as markdown: a row per scenario (medians), then the ratios.

    >>> print(table({"machine": {"cpus": 2, "cpu_model": "Xeon", "cpu_isa": "AVX2",
    ...     "memory_gib": 23.5, "engine, W2 batch of 16, ms": 0.5}, "started": "today",
    ...     "rounds": 3, "duration_s": 10, "checks": {"mismatches": 0},
    ...     "scenarios": {"W2 unary": {"load": "h2load 8 x 16", "unit": "req/s",
    ...     "medians": {"worker": 3210.4, "empty handler": 6420.0}}}}))
    ... # doctest: +NORMALIZE_WHITESPACE
    Run today on 2 cores (Xeon, AVX2), 23.5 GiB; a W2 batch of 16 through the engine alone: 0.5 ms.
    Medians of 3 rounds of 10 s loads. Checks: mismatches 0.
    <BLANKLINE>
    | scenario | load | worker | empty handler | unit |
    | --- | --- | ---: | ---: | --- |
    | W2 unary | h2load 8 x 16 | 3,210 | 6,420 | req/s |
    <BLANKLINE>
    | ratio | value |
    | --- | ---: |
    | W2 unary: worker / empty handler | 0.50 |
    """
    scenarios = results["scenarios"]
    servers = [name for name in SERVERS if any(name in s["medians"] for s in scenarios.values())]
    servers += sorted(
        {server for s in scenarios.values() for server in s["medians"]} - set(servers)
    )
    machine = results["machine"]
    checks = ", ".join(f"{name} {count}" for name, count in sorted(results["checks"].items()))
    lines = [
        f"Run {results['started']} on {machine['cpus']} cores ({machine['cpu_model']}, "
        f"{machine['cpu_isa']}), {machine['memory_gib']} GiB; a W2 batch of 16 through the "
        f"engine alone: {machine['engine, W2 batch of 16, ms']} ms.",
        f"Medians of {results['rounds']} rounds of {results['duration_s']} s loads. "
        f"Checks: {checks}.",
        "",
        "| scenario | load | " + " | ".join(servers) + " | unit |",
        "| --- | --- | " + " | ".join("---:" for _ in servers) + " | --- |",
    ]
    for name, scenario in scenarios.items():
        cells = [
            f"{scenario['medians'][s]:,.0f}" if s in scenario["medians"] else "" for s in servers
        ]
        lines.append(
            f"| {name} | {scenario['load']} | " + " | ".join(cells) + f" | {scenario['unit']} |"
        )
    found = results.get("ratios") or ratios({n: s["medians"] for n, s in scenarios.items()})
    if found:
        lines += ["", "| ratio | value |", "| --- | ---: |"]
        lines += [f"| {name} | {value:.2f} |" for name, value in found.items()]
    return "\n".join(lines)


def write_page_table(rendered: str, page: Path = BENCHMARKS_PAGE) -> None:
    """Put ``rendered`` between the benchmark page's markers."""
    text = page.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    page.write_text(f"{head}{TABLE_START}\n{rendered}\n{TABLE_END}{tail}")


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
    with harness.worktree(args.baseline) as tree:
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
