"""A scaling rehearsal on loopback: CPU-capped workers started and drained by an autoscaler
under a load ramp to 3 x one worker's capacity and back, once per signal.

    sudo .venv/bin/python -m bench.rehearsal --capacity 345       # busy, then CPU: ~18 min
    sudo .venv/bin/python -m bench.rehearsal --capacity 345 --controllers inflight
    .venv/bin/python -m bench.rehearsal --table                  # the last run, as in the docs

- **Workers** are pods: each in a cgroup with a CFS quota of ``--cpus``
  (:mod:`bench.capped`), on its own loopback address (127.0.0.11, .12, ...), the same
  port, ``max_connection_age_s`` short so that clients re-resolve and find new workers.
- **Discovery** is a headless Service: a DNS name whose A records are the workers that
  report SERVING (:mod:`bench.discovery`). A worker joins once SERVING; one scaled down
  leaves the name first, then gets SIGTERM and drains (announce, refuse, exit).
- **Callers** are one process with one channel on ``dns://.../name:port`` and the client
  library's channel settings (round_robin, health checking, UNAVAILABLE retried), sending
  W1 calls open-loop at ``profile x capacity`` per second and checking every answer's
  bytes (the request serialized once: the callers share the machine's 2 cores).
- **The controller** scrapes every worker's ``/metrics`` (and its CPU seconds, as cAdvisor
  reads them) every ``--sync-s`` and applies the HPA's algorithm (:mod:`bench.autoscaler`)
  to one signal: ``busy`` (rate of ``roundtrip_busy_seconds_total`` per pod, the target
  docs/autoscaling.md gives), ``inflight`` (rate of ``roundtrip_inflight_seconds_total``)
  or ``cpu`` (CPU over the limit, target 70%, the base HPA). Kubernetes' periods are
  scaled down (sync 15 -> ``--sync-s``, rate window 1 m -> ``--window-s``, scale-down
  stabilization 300 -> ``--down-window-s`` seconds).

Reports per phase: offered load, replicas (ready, at the phase's end and most), OK answers
per second, p50/p99 of OK answers, calls by code. Writes ``docs/bench/autoscaling.json``
under ``rehearsal``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import socket
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from bench.autoscaler import Hpa
from bench.capped import CpuCap, cpu_seconds
from bench.checks import ROUNDTRIP, workload_body
from bench.discovery import Records
from bench.harness import OUT, machine
from bench.loads import percentiles
from support.workers import WorkerProcess, metric_value

PROFILE = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 2.0, 1.0, 0.5)
NAME = "workers.rehearsal.test"
CPU_TARGET = 0.7  # the base HPA's
BUSY_TARGET = 0.45  # docs/autoscaling.md's, for pods below 1 CPU
RESULTS = OUT / "autoscaling.json"


class Pod:
    """One worker: its cgroup, process and address; ``ready`` once it joined the name."""

    def __init__(self, index: int, port: int, cpus: float, flags: list[str]) -> None:
        self.address = f"127.0.0.{11 + index}"
        self.cap = CpuCap(f"roundtrip-rehearsal-{index}", cpus)
        self.cpus = cpus
        command = [sys.executable, "-m", "roundtrip.server", "--host", self.address]
        command += ["--port", str(port), "--metrics-port", "0", "--http-port", "0", *flags]
        self.command = self.cap.command(command)
        self.worker: WorkerProcess | None = None
        self.ready = False
        self.samples: deque[dict[str, float]] = deque(maxlen=64)

    def start(self, records: Records) -> None:
        self.worker = WorkerProcess(command=self.command)
        self.worker.wait_serving(timeout=600)
        self.ready = True
        records.addresses = [*records.addresses, self.address]

    def stop(self, records: Records) -> None:
        """Leave the name, then drain (SIGTERM) and exit."""
        self.ready = False
        records.addresses = [a for a in records.addresses if a != self.address]
        if self.worker is not None:
            self.worker.terminate(timeout=120)
        self.cap.remove()

    def sample(self) -> None:
        assert self.worker is not None
        page = self.worker.scrape()
        self.samples.append(
            {
                "at": time.monotonic(),
                "busy": metric_value(page, "roundtrip_busy_seconds_total"),
                "inflight": metric_value(page, "roundtrip_inflight_seconds_total"),
                "cpu": cpu_seconds(self.worker.process.pid) / self.cpus,
            }
        )

    def signal(self, kind: str, window_s: float) -> float | None:
        """The pod's ``busy``, ``inflight`` or ``cpu`` signal over the last ``window_s``
        (None: not ready or not enough samples), as ``rate(...[window])`` reads it."""
        if not self.ready or len(self.samples) < 2:
            return None
        now = self.samples[-1]
        then = next((s for s in self.samples if s["at"] >= now["at"] - window_s), now)
        seconds = now["at"] - then["at"]
        return (now[kind] - then[kind]) / seconds if seconds > 0 else None


def free_port(addresses: list[str]) -> int:
    """A port free on every one of ``addresses``."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        try:
            for address in addresses:
                with socket.socket() as other:
                    other.bind((address, port))
            return port
        except OSError:
            continue


def controller(
    args: argparse.Namespace,
    kind: str,
    target: float,
    records: Records,
    port: int,
    done: threading.Event,
) -> list[dict[str, Any]]:
    """Scale workers on ``kind`` until ``done``; the timeline of its decisions."""
    flags = [
        "--warmup-shapes",
        "3:4",
        "--audit-fraction",
        "0",
        "--max-connection-age-s",
        str(args.connection_age_s),
        "--drain-announce-s",
        "2",
        "--drain-grace-s",
        "10",
        "--compilation-cache-dir",
        str(args.cache),
    ]
    hpa = Hpa(
        target=target,
        min_replicas=1,
        max_replicas=args.max_replicas,
        down_window_s=args.down_window_s,
    )
    pods: list[Pod] = []
    started = 0
    timeline: list[dict[str, Any]] = []

    def add() -> None:
        nonlocal started
        pod = Pod(started, port, args.cpus, flags)
        started += 1
        pods.append(pod)
        threading.Thread(target=pod.start, args=(records,), daemon=True).start()

    add()
    while not all(pod.ready for pod in pods):
        time.sleep(0.5)
    begin = time.time()
    while not done.wait(args.sync_s):
        for pod in pods:
            if pod.ready:
                with contextlib.suppress(OSError):  # a worker stopping between the two
                    pod.sample()
        values = [pod.signal(kind, args.window_s) for pod in pods]
        desired = hpa.desired(time.monotonic(), values)
        if desired > len(pods):
            for _ in range(desired - len(pods)):
                add()
        elif desired < len(pods):
            leaving = [pod for pod in reversed(pods) if pod.ready][: len(pods) - desired]
            for pod in leaving:
                pods.remove(pod)
                threading.Thread(target=pod.stop, args=(records,), daemon=True).start()
        timeline.append(
            {
                "t": round(time.time() - begin, 1),
                "at": time.time(),
                "signal": [None if v is None else round(v, 3) for v in values],
                "replicas": len(pods),
                "ready": sum(pod.ready for pod in pods),
            }
        )
    for pod in pods:
        pod.stop(records)
    return timeline


def load(target: str, capacity: float, profile: list[float], phase_s: float, out: str) -> None:
    """The callers' process: the profile's rates, open-loop, every answer's bytes checked.
    Through the client library's channel settings (round_robin, health checking, UNAVAILABLE
    retried), with the request serialized once, so that the callers cost little CPU."""
    import grpc

    from roundtrip.client.channel import channel_options
    from roundtrip.v1 import roundtrip_pb2 as pb

    body = workload_body("W1")
    request = body.request.SerializeToString()
    orig, merged, diff = body.expected
    expected = pb.RoundTripResponse(orig_sum=orig, merged_sum=merged, max_abs_diff=diff)
    answer = expected.SerializeToString()
    calls: list[tuple[float, float, str]] = []

    async def run() -> None:
        async with grpc.aio.insecure_channel(target, channel_options()) as channel:
            call = channel.unary_unary(ROUNDTRIP, None, None)

            async def one(sent: float) -> None:
                started = time.perf_counter()
                try:
                    code = "OK" if await call(request, timeout=10) == answer else "WRONG"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                calls.append((sent, time.perf_counter() - started, code))

            tasks = set()
            start = time.monotonic()
            wall = time.time()
            due = 0.0
            for share in profile:
                rate = share * capacity
                ends = due + phase_s
                while due < ends:
                    delay = start + due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.create_task(one(wall + due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    due += 1 / rate
            await asyncio.gather(*tasks)

    asyncio.run(run())
    Path(out).write_text(json.dumps(calls))


def phases(
    calls: list[list[Any]],
    timeline: list[dict[str, Any]],
    begin: float,
    args: argparse.Namespace,
    capacity: float,
) -> list[dict[str, Any]]:
    """Per phase of the profile: what callers got, and the replicas."""
    report = []
    for index, share in enumerate(args.profile):
        low, high = begin + index * args.phase_s, begin + (index + 1) * args.phase_s
        inside = [c for c in calls if low <= c[0] < high]
        ticks = [t for t in timeline if low <= t["at"] < high] or [timeline[-1]]
        ok = [c[1] for c in inside if c[2] == "OK"]
        report.append(
            {
                "offered_per_s": round(share * capacity),
                "replicas_end": ticks[-1]["replicas"],
                "ready_most": max(t["ready"] for t in ticks),
                "ok_per_s": round(len(ok) / args.phase_s),
                **percentiles(ok),
                "codes": dict(Counter(c[2] for c in inside)),
            }
        )
    return report


def rehearse(args: argparse.Namespace, kind: str, target: float) -> dict[str, Any]:
    addresses = [f"127.0.0.{11 + i}" for i in range(64)]
    port = free_port(addresses)
    out = OUT / f".rehearsal-{kind}.json"
    done = threading.Event()
    with Records(NAME) as records:
        result: dict[str, Any] = {}
        control = threading.Thread(
            target=lambda: result.setdefault(
                "timeline", controller(args, kind, target, records, port, done)
            )
        )
        control.start()
        while not records.addresses:
            time.sleep(0.5)
        begin = time.time() + 1.0
        callers = multiprocessing.get_context("spawn").Process(
            target=load,
            args=(records.target(port), args.capacity, args.profile, args.phase_s, str(out)),
        )
        time.sleep(max(0.0, begin - time.time()))
        callers.start()
        callers.join()
        done.set()
        control.join()
    calls = json.loads(out.read_text())
    out.unlink()
    return {
        "signal": kind,
        "target": target,
        "phases": phases(calls, result["timeline"], begin, args, args.capacity),
        "codes": dict(Counter(c[2] for c in calls)),
        "pod_seconds": round(sum(t["replicas"] for t in result["timeline"]) * args.sync_s),
        "timeline": [{k: v for k, v in t.items() if k != "at"} for t in result["timeline"]],
    }


def table(report: dict[str, Any]) -> str:
    """The rehearsal as docs/autoscaling.md shows it: one row per controller and phase."""
    rows = [
        "| signal | load (x capacity) | calls/s | replicas at end | most ready | OK/s | "
        "p50 ms | p99 ms | not OK |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, run in report["runs"].items():
        for share, phase in zip(report["profile"], run["phases"], strict=True):
            others = sum(n for code, n in phase["codes"].items() if code != "OK")
            rows.append(
                f"| {kind} | {share} | {phase['offered_per_s']} | {phase['replicas_end']} | "
                f"{phase['ready_most']} | {phase['ok_per_s']} | {phase['p50_ms']} | "
                f"{phase['p99_ms']} | {others} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controllers", default="busy,cpu", help="busy, inflight or cpu")
    parser.add_argument("--table", action="store_true", help="print the last run's table")
    parser.add_argument("--cpus", type=float, default=0.25)
    parser.add_argument(
        "--capacity",
        type=float,
        default=0.0,
        help="one worker's OK calls per second at --cpus (bench.signal)",
    )
    parser.add_argument("--busy-target", type=float, default=BUSY_TARGET)
    parser.add_argument("--inflight-target", type=float, default=2.0)
    parser.add_argument("--phase-s", type=float, default=50.0)
    parser.add_argument("--sync-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--down-window-s", type=float, default=60.0)
    parser.add_argument("--connection-age-s", type=float, default=15.0)
    parser.add_argument("--max-replicas", type=int, default=5)
    parser.add_argument(
        "--profile", type=lambda s: [float(p) for p in s.split(",")], default=list(PROFILE)
    )
    parser.add_argument("--cache", type=Path, default=OUT.parent.parent / ".bench" / "xla-cache")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())["rehearsal"]))
        return
    if args.capacity <= 0:
        parser.error("--capacity: one worker's OK calls per second at --cpus (bench.signal)")
    args.cache.mkdir(parents=True, exist_ok=True)
    runs = {}
    for kind in args.controllers.split(","):
        target = {"busy": args.busy_target, "inflight": args.inflight_target}.get(kind, CPU_TARGET)
        runs[kind] = rehearse(args, kind, target)
        print(
            json.dumps({k: v for k, v in runs[kind].items() if k != "timeline"}, indent=1),
            flush=True,
        )
    report = {
        "command": "python -m bench.rehearsal " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "cpus": args.cpus,
        "capacity_ok_per_s": args.capacity,
        "profile": args.profile,
        "phase_s": args.phase_s,
        "sync_s": args.sync_s,
        "window_s": args.window_s,
        "down_window_s": args.down_window_s,
        "connection_age_s": args.connection_age_s,
        "runs": runs,
    }
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    saved["rehearsal"] = report
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
