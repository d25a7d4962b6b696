"""Worker processes sharing one port (SO_REUSEPORT) against one process, on W2 unary.

    python -m bench.processes --duration 10

grpcio binds with SO_REUSEPORT by default on Linux, so N worker processes
started on the same port each get a share of the connections from the
kernel, each with its own JAX runtime. This measures, one after the other on
this machine, h2load (8 connections x 16 streams, W2) against: the empty
handler (one process), the empty handler (N processes), the worker (one
process) and the worker (N processes). Writes ``docs/bench/processes.json``.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bench.run import OUT, ROOT, WORKLOADS, _wait_answering, cases, check_body, h2load


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def processes(kind: str, count: int, port: int) -> Iterator[None]:
    """``count`` servers of ``kind`` on ``port``; yields once each has said it is ready."""
    if kind == "worker":
        command = [sys.executable, "-m", "roundtrip.server", "--port", str(port)]
        command += ["--metrics-port", "0", "--warmup-shapes", "64:64", "--audit-fraction", "0"]
        ready_event = "serving"
    else:
        command = [sys.executable, "-m", "bench.servers", kind, "--port", str(port)]
        ready_event = "listening"
    started = []
    ready = threading.Semaphore(0)

    def watch(process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            try:
                if json.loads(line).get("event") == ready_event:
                    ready.release()
            except json.JSONDecodeError:
                continue

    try:
        for _ in range(count):
            process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            started.append(process)
            threading.Thread(target=watch, args=(process,), daemon=True).start()
        for _ in range(count):
            if not ready.acquire(timeout=600):
                raise RuntimeError(f"{kind} processes did not all become ready")
        _wait_answering(port)
        yield
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians kept")
    args = parser.parse_args()
    w2 = cases(*WORKLOADS["W2"], 1, check=True)[0]
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for kind in ("empty", "worker"):
            for count in (1, args.processes):
                port = free_port()
                with processes(kind, count, port):
                    if kind == "worker":
                        check_body(port, w2)
                    figures = h2load(
                        port, w2.request, duration=args.duration, clients=8, streams=16
                    )
                name = f"{kind} x{count}"
                runs.setdefault(name, []).append(figures["rps"])
                print(name, json.dumps(figures), flush=True)
    medians = {name: sorted(values)[len(values) // 2] for name, values in runs.items()}
    one = medians["empty x1"]
    result = {
        "workload": "W2 (64 float32 values, features 64), h2load 8 connections x 16 streams",
        "processes": args.processes,
        "rounds": args.rounds,
        "runs_rps": runs,
        "median_rps": medians,
        "ratio_to_empty_x1": {name: round(value / one, 2) for name, value in medians.items()},
    }
    print(json.dumps(result, indent=2))
    (OUT / "processes.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
