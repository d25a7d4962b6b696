"""The docs are reference, and what they show is true: the benchmark table is the one the
last ``make bench`` wrote, links land, decisions are records, history is in the changelog."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from bench import engine as engine_bench
from bench.report import TABLE_END, TABLE_START, table
from roundtrip.server.numerics.numerics import cpu_flags, supported_levels
from support.workers import ROOT

DOCS = ROOT / "docs"
REFERENCE_PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
#: A commit as reference docs must not name one: 7 to 40 hex digits, letters and digits both.
COMMIT = re.compile(r"(`|commit )(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def test_the_benchmark_table_is_the_one_the_last_run_wrote() -> None:
    page = (DOCS / "benchmarks.md").read_text()
    shown = page.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    results = json.loads((DOCS / "bench" / "results.json").read_text())
    assert shown == table(results)


def test_the_engine_table_is_the_one_the_last_engine_run_wrote() -> None:
    page = (DOCS / "benchmarks.md").read_text()
    shown = page.split(engine_bench.TABLE_START)[1].split(engine_bench.TABLE_END)[0].strip()
    results = json.loads((DOCS / "bench" / "engine.json").read_text())
    assert shown == engine_bench.table(results["workloads"])


def test_the_last_benchmark_run_found_every_answer_exact() -> None:
    results = json.loads((DOCS / "bench" / "results.json").read_text())
    assert results["checks"].get("mismatches", 0) == 0
    assert results["checks"].get("not OK", 0) == 0
    assert results["checks"]["answers checked"] > 1000


def test_the_gpu_table_is_the_accelerator_runs_figures() -> None:
    page = (DOCS / "benchmarks.md").read_text().split("## GPU", 1)[1]
    medians = json.loads((DOCS / "bench" / "accelerator.json").read_text())["medians"]
    for row, key in [
        ("W2 unary", "W2 unary"),
        ("W2 RoundTripBatch x64", "W2 RoundTripBatch x64 results/s"),
        ("W3 one seed repeated", "W3 repeated seed"),
        ("W3 a fresh seed per request", "W3 fresh seeds"),
    ]:
        line = next(line for line in page.splitlines() if line.startswith(f"| {row}"))
        gpu, cpu = (f"{medians[f'{key}, {where}']:,.0f}" for where in ("accelerator", "cpu"))
        assert f"| {gpu} | {cpu} |" in line, (line, gpu, cpu)


def test_the_benchmark_page_is_short_and_reference_pages_name_no_commit() -> None:
    assert len((DOCS / "benchmarks.md").read_text().splitlines()) <= 200
    for page in REFERENCE_PAGES:
        assert not COMMIT.search(page.read_text()), page.name


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading.

    >>> github_anchor("The drain: nothing lost on a rollout")
    'the-drain-nothing-lost-on-a-rollout'
    """
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize(
    "page",
    [*REFERENCE_PAGES, *sorted((DOCS / "adr").glob("*.md")), ROOT / "CHANGELOG.md"],
    ids=lambda page: page.name,
)
def test_every_relative_link_lands(page: Path) -> None:
    for target in re.findall(r"\]\(((?!https?:)[^)\s]+)\)", page.read_text()):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target}"


def test_every_decision_is_a_record_listed_in_the_index() -> None:
    records = sorted((DOCS / "adr").glob("[0-9][0-9][0-9][0-9]-*.md"))
    index = (DOCS / "adr" / "README.md").read_text()
    assert len(records) >= 7
    for record in records:
        text = record.read_text()
        for section in ("## Context", "## Decision", "## Evidence", "## Consequences"):
            assert section in text, (record.name, section)
        assert f"({record.name})" in index, record.name


def test_the_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert re.search(r"^## \[0\.1\.0\] - \d{4}-\d{2}-\d{2}$", text, flags=re.MULTILINE)


@pytest.mark.skipif(
    "AVX2" not in supported_levels(cpu_flags() or frozenset()), reason="needs an AVX2 x86 CPU"
)
def test_the_numerics_page_reproduces_a_workers_bits_as_it_says() -> None:
    page = (DOCS / "numerics.md").read_text()
    [command] = re.findall(r"```sh\n(XLA_FLAGS=.*)\n```", page)
    *assignments, python, flag, code = shlex.split(command)
    env = dict(assignment.split("=", 1) for assignment in assignments)
    done = subprocess.run(
        [str(ROOT / python), flag, code],
        capture_output=True,
        text=True,
        env={**env, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        check=True,
    )
    assert "orig_sum=-4.221933364868164" in done.stdout


#: A repository path as code and comments name one (``docs/operations.md``, a test module).
NAMED_PATH = re.compile(r"(?<![\w/.-])((?:docs|tests|bench|support|deploy|examples)/[\w./-]*\w)")


def exists(named: str) -> bool:
    """Whether ``named`` is in the repository (an ADR may be named by its number alone)."""
    path = ROOT / named.split("#")[0]
    return path.exists() or any(path.parent.glob(f"{path.name}-*.md"))


def test_every_path_named_in_the_code_exists() -> None:
    """A docstring or comment that sends a reader to ``docs/...`` (or a test, a bench script)
    sends them somewhere real: moved or deleted pages fail here, not in a reader's hands."""
    sources = [
        path
        for folder in ("server", "client", "support", "bench", "tests", "examples")
        for path in (ROOT / folder).rglob("*.py")
        if "v2proto" not in path.parts and "/v1/" not in path.as_posix()
    ]
    missing = sorted(
        f"{path.relative_to(ROOT)}: {named}"
        for path in sources
        for named in set(NAMED_PATH.findall(path.read_text()))
        if not exists(named)
    )
    assert missing == []
