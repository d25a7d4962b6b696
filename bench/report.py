"""A benchmark run's report: the ratios it has, its markdown table, and the table written
into docs/benchmarks.md (``tests/test_docs.py`` checks the page shows the last run's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.scenarios import RATIOS, SERVERS
from support.workers import ROOT

BENCHMARKS_PAGE = ROOT / "docs" / "benchmarks.md"
TABLE_START = "<!-- make bench writes the table below from docs/bench/results.json -->"
TABLE_END = "<!-- end of make bench's table -->"


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


def write_page_table(
    rendered: str,
    page: Path = BENCHMARKS_PAGE,
    start: str = TABLE_START,
    end: str = TABLE_END,
) -> None:
    """Put ``rendered`` between the benchmark page's markers (``start``, ``end``)."""
    text = page.read_text()
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    page.write_text(f"{head}{start}\n{rendered}\n{end}{tail}")
