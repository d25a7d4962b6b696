"""Every command the README shows is run here, against a real worker."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import socket
import subprocess

import pytest

from support.workers import ROOT, WorkerProcess, console_script

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


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_example_runs(worker: WorkerProcess, index: int) -> None:
    source = blocks("python")[index].replace(DEFAULT_TARGET, worker.target)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, f"README python block {index}", "exec"), {})
    assert "-4.221933364868164" in printed.getvalue()


@pytest.mark.parametrize("line", shell_lines("roundtrip "))
def test_readme_cli_command_runs(worker: WorkerProcess, line: str) -> None:
    args = shlex.split(line.replace(DEFAULT_TARGET, worker.target))[1:]
    if "--target" not in args:
        args = ["--target", worker.target, *args]
    done = subprocess.run([console_script("roundtrip"), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout


@pytest.mark.parametrize("line", shell_lines("echo "))
def test_readme_piped_cli_command_runs(worker: WorkerProcess, line: str) -> None:
    source, _, command = line.partition(" | ")
    args = shlex.split(command.replace(DEFAULT_TARGET, worker.target))
    assert args[0] == "roundtrip"
    done = subprocess.run(
        [console_script("roundtrip"), *args[1:]],
        input=shlex.split(source)[1] + "\n",
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "-4.2219334" in done.stdout


@pytest.mark.external
def test_readme_tritonclient_example_runs(worker: WorkerProcess) -> None:
    """The ```py blocks run where tritonclient is installed (tests/test_tritonclient.py)."""
    [source] = blocks("py")
    done = subprocess.run(
        [str(TRITON_PYTHON), "-c", source.replace(DEFAULT_TARGET, worker.target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[[-4.221933364868164, -4.221933364868164, 0.0]]\n"


@pytest.mark.external
@pytest.mark.parametrize("line", shell_lines("curl "))
def test_readme_curl_command_prints_what_it_says(worker: WorkerProcess, line: str) -> None:
    address = f"127.0.0.1:{worker.http_port}"
    done = subprocess.run(
        shlex.split(line.replace(DEFAULT_HTTP, address)), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    printed = re.search(r"prints `(\{.*?\})`", README)
    assert printed is not None
    assert done.stdout == printed.group(1)


@pytest.mark.parametrize("line", shell_lines("buf curl"))
def test_readme_buf_curl_command_runs(worker: WorkerProcess, line: str) -> None:
    args = shlex.split(line.replace(DEFAULT_TARGET, worker.target))[1:]
    done = subprocess.run([console_script("buf"), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "-4.221933364868164" in done.stdout


def test_readme_names_the_two_commands() -> None:
    assert shell_lines("make serve")
    assert shell_lines("make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.slow
def test_make_serve_starts_a_worker_that_answers_and_logs_only_json_lines() -> None:
    """A whole run: answers, idle metrics connections that time out, REST callers that
    hang up mid-upload or send garbage, and a drain; every line the worker writes to stderr
    is one JSON object (make's own line about the signal aside)."""
    worker = WorkerProcess(
        command=[
            "make",
            "--no-print-directory",
            "serve",
            "PORT=0",
            "METRICS_PORT=0",
            "HTTP_PORT=0",
        ],
        env={"ROUNDTRIP_METRICS_TIMEOUT_S": "1"},
    )
    try:
        worker.wait_serving()
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


def test_readme_links_exist() -> None:
    for link in re.findall(r"\]\(((?!http)[^)#]+)\)", README):
        assert (ROOT / link).exists() or (ROOT / link).resolve().exists(), link
