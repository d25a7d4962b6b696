"""Every command the README shows is run here, against a real worker."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from support.workers import ROOT, WorkerProcess

README = (ROOT / "README.md").read_text()
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_HTTP = "127.0.0.1:8000"
TRITON_PYTHON = ROOT / ".tools" / "tritonclient" / "bin" / "python"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def shell_lines(prefix: str) -> list[str]:
    return [
        line.split("  #")[0].strip()
        for block in blocks("sh")
        for line in block.splitlines()
        if line.startswith(prefix)
    ]


#: Lines of the README's shell blocks that install or build rather than call the worker
#: (``make serve`` is the command the walk runs first; the others have their own tests:
#: tests/test_packaging.py builds and installs the wheel, ``make test`` is the gate).
NOT_CALLS = ("make ", "pip install ")
#: The README's addresses, and which of the served worker's ports stands for each.
ADDRESSES = {DEFAULT_TARGET: "port", DEFAULT_HTTP: "http_port", "127.0.0.1:9464": "metrics_port"}


@pytest.fixture(scope="module")
def served() -> Iterator[WorkerProcess]:
    """The worker ``make serve`` starts, as the README says to start it (on free ports)."""
    command = ["make", "--no-print-directory", "serve", "PORT=0", "METRICS_PORT=0"]
    worker = WorkerProcess(
        command=[*command, "HTTP_PORT=0"], env={"ROUNDTRIP_METRICS_TIMEOUT_S": "1"}
    )
    try:
        worker.wait_serving()
        yield worker
    finally:
        worker.kill()


def on(worker: WorkerProcess, text: str) -> str:
    for address, port in ADDRESSES.items():
        text = text.replace(address, f"127.0.0.1:{getattr(worker, port)}")
    return text


def run_shell_line(worker: WorkerProcess, line: str) -> None:
    """One line of a shell block, as written, in a shell whose PATH starts with
    ``.venv/bin`` (the README: activate the environment, or call its commands by path);
    what its comment or the README's ``prints`` says it prints, it prints."""
    command, _, comment = line.partition("  # ")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", on(worker, command)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, (line, done.stderr)
    assert done.stdout, line
    if comment.startswith("{"):
        assert done.stdout.strip() == comment.strip(), line
    if command.startswith("curl "):
        printed = re.search(r"prints `(\{.*?\})`", README)
        assert printed is not None
        assert done.stdout == printed.group(1)
    if command.startswith(("buf curl", "echo ")):
        assert "-4.22193" in done.stdout


def run_python_block(source: str, language: str) -> None:
    """A ``python`` block in this environment (the client's); a ``py`` block where
    tritonclient is installed. Each prints the worked example's answer."""
    python = sys.executable if language == "python" else str(TRITON_PYTHON)
    done = subprocess.run([python, "-c", source], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (source, done.stderr)
    assert "-4.221933364868164" in done.stdout, source


@pytest.mark.slow
@pytest.mark.external
def test_every_readme_snippet_runs_as_written_in_order_after_make_serve(
    served: WorkerProcess,
) -> None:
    ran = []
    for language, source in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.DOTALL):
        if language in ("python", "py"):
            run_python_block(on(served, source), language)
            ran.append(language)
        elif language == "sh":
            for line in filter(None, (line.strip() for line in source.splitlines())):
                if not line.startswith((*NOT_CALLS, "#")):
                    run_shell_line(served, line)
                    ran.append(line.split()[0])
    assert {"python", "py", "roundtrip", "echo", "buf", "curl"} <= set(ran)


def test_readme_names_the_two_commands() -> None:
    assert shell_lines("make serve")
    assert shell_lines("make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.slow
def test_make_serve_starts_a_worker_that_answers_and_logs_only_json_lines(
    served: WorkerProcess,
) -> None:
    """A whole run (after the README's snippets): answers, idle metrics connections that
    time out, REST callers that hang up mid-upload or send garbage, and a drain; every line
    the worker writes to stderr is one JSON object (make's own line about the signal aside)."""
    worker = served
    try:
        from roundtrip.client import RoundTripClient

        with RoundTripClient(worker.target) as client:
            assert client.round_trip(0, [1.0, 2.0, 3.0], 4).orig_sum == -4.221933364868164
        idle = [socket.create_connection(("127.0.0.1", worker.metrics_port)) for _ in range(3)]
        with socket.create_connection(("127.0.0.1", worker.http_port)) as gone:
            gone.sendall(
                b"POST /v2/models/roundtrip/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 1000\r\nInference-Header-Content-Length: 10\r\n\r\n{}"
            )
        with socket.create_connection(("127.0.0.1", worker.http_port)) as garbage:
            garbage.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            garbage.settimeout(10)
            garbage.recv(1024)
        for connection in idle:  # each is closed by the worker once its time is up
            connection.settimeout(10)
            assert connection.recv(1) == b""
            connection.close()
        worker.terminate()  # SIGTERM to make and the worker; make itself reports the signal
        assert [e["event"] for e in worker.events][-1] == "stopped"
        lines = [e["line"] for e in worker.events if e["event"] == "non-json"]
        assert [line for line in lines if not line.startswith("make: ")] == []
    finally:
        worker.kill()


def words_under(link: str) -> int:
    """The words a "Start here" link leads to: a README section (its subsections too), a
    file, or, for a folder's README, every page of the folder."""
    if link.startswith("#"):
        sections = re.split(r"^## (.*)$", README, flags=re.MULTILINE)
        for title, text in zip(sections[1::2], sections[2::2], strict=True):
            if "#" + re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-") == link:
                return len(text.split())
        raise AssertionError(f"no section {link}")
    path = ROOT / link
    pages = sorted(path.parent.glob("*.md")) if path.name == "README.md" else [path]
    return sum(len(page.read_text().split()) for page in pages)


def test_start_here_says_how_long_each_reading_is() -> None:
    """Each row's length is within 15% of the words its links lead to."""
    start = README.split("## Start here", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| ([\d,]+) \|$", start, flags=re.MULTILINE)
    assert len(rows) >= 8
    for purpose, links, stated in rows:
        counted = sum(words_under(link) for link in re.findall(r"\]\(([^)]+)\)", links))
        assert abs(counted - int(stated.replace(",", ""))) <= 0.15 * counted, (purpose, counted)


def test_readme_links_exist() -> None:
    for link in re.findall(r"\]\(((?!http)[^)#]+)\)", README):
        assert (ROOT / link).exists() or (ROOT / link).resolve().exists(), link
