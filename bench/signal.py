"""Which load signal to scale on, and at what target: one CPU-capped worker under a ramp.

    python -m bench.signal                       # W1 unary; 2, 1, 0.5, 0.25 CPU: ~10 min
    python -m bench.signal --cpus 1 --step-s 15  # one pod size, longer steps

Each worker runs in a cgroup with a CFS quota of ``--cpus`` (how the kubelet enforces
``resources.limits.cpu``; root only, :mod:`bench.capped`). Its capacity is first measured
closed-loop; then requests arrive open-loop (on a fixed schedule, not waiting for answers,
as traffic from many services does) at a rising share of that capacity, ``--step-s``
seconds a step, the backlog drained between steps. Per step it reports what callers saw
(OK answers per second, p50/p99 of OK answers, calls by code) beside every candidate
signal, each read the way an autoscaler reads it (from ``/metrics`` before and after the
step, or from the process, as cAdvisor does):

- ``busy``: ``rate(roundtrip_busy_seconds_total)``, the share of time with a request in
  flight (the worker's utilisation);
- ``inflight``: ``rate(roundtrip_inflight_seconds_total)``, the mean number in flight;
- ``inflight_sampled``: the ``roundtrip_inflight_requests`` gauge, sampled every 15 s
  as Prometheus would (here: the mean of samples every 0.5 s, its best case);
- ``queue_to_compute``: queue wait over compute time (Triton's autoscaling signal);
- ``cpu``: CPU seconds per second over the limit (the shipped HPA's signal).

Writes ``docs/bench/autoscaling.json`` under ``signal`` and the workload;
``--table`` prints a run as docs/autoscaling.md shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.capped import CpuCap, cpu_seconds
from bench.checks import workload_body
from bench.harness import OUT, machine
from bench.loads import closed_loop, open_loop
from support.polling import wait_for
from support.workers import FREE_PORTS, WORKER_DEFAULTS, WorkerProcess, metric_value

SHARES = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.3)
RESULTS = OUT / "autoscaling.json"

#: The samples read from /metrics around a step: (name in the report, sample).
COUNTERS = {
    "busy_s": "roundtrip_busy_seconds_total",
    "inflight_s": "roundtrip_inflight_seconds_total",
    "queue_s": "roundtrip_queue_wait_seconds_sum",
    "compute_s": "roundtrip_batch_compute_seconds_sum",
    "batch_requests": "roundtrip_queue_wait_seconds_count",
}


def snapshot(worker: WorkerProcess) -> dict[str, float]:
    """The counters an autoscaler differentiates, and the worker's CPU seconds, now."""
    page = worker.scrape()
    values = {key: metric_value(page, sample, missing=0.0) for key, sample in COUNTERS.items()}
    values["cpu_s"] = cpu_seconds(worker.process.pid)
    values["at"] = time.monotonic()
    return values


def signals(before: dict[str, float], after: dict[str, float], cpus: float) -> dict[str, float]:
    """Each candidate signal over the step, from two snapshots."""
    delta = {key: after[key] - before[key] for key in before}
    seconds = delta["at"]
    return {
        "busy": round(delta["busy_s"] / seconds, 3),
        "inflight": round(delta["inflight_s"] / seconds, 2),
        "queue_to_compute": round(delta["queue_s"] / max(delta["compute_s"], 1e-9), 2),
        "mean_queue_ms": round(1000 * delta["queue_s"] / max(delta["batch_requests"], 1), 2),
        "cpu": round(delta["cpu_s"] / seconds / cpus, 3),
    }


async def sampled_gauge(worker: WorkerProcess, seconds: float) -> float:
    """The in-flight gauge's mean over samples every 0.5 s (read off the event loop)."""
    samples = []
    for _ in range(int(seconds / 0.5)):
        await asyncio.sleep(0.5)
        page = await asyncio.to_thread(worker.scrape)
        samples.append(metric_value(page, "roundtrip_inflight_requests"))
    return sum(samples) / max(len(samples), 1)


async def step(
    worker: WorkerProcess, body: bytes, rate: float, seconds: float, cpus: float
) -> dict[str, Any]:
    before = snapshot(worker)
    load, sampled = await asyncio.gather(
        open_loop(worker.port, body, rate, seconds), sampled_gauge(worker, seconds)
    )
    after = snapshot(worker)
    return {
        "offered_per_s": round(rate, 1),
        "ok_per_s": load["accepted_per_s"],
        **load["accepted"],
        "codes": load["codes"],
        **signals(before, after, cpus),
        "inflight_sampled": round(sampled, 2),
    }


def ramp(cpus: float, step_s: float, workload: str, shares: list[float]) -> dict[str, Any]:
    """One worker capped at ``cpus``: its capacity, then every step of the ramp."""
    body = workload_body(workload).request.SerializeToString()
    flags = ("--warmup-shapes", "3:4,64:64", "--audit-fraction", "0")
    command = [sys.executable, "-m", "roundtrip.server", *FREE_PORTS, *WORKER_DEFAULTS, *flags]
    with CpuCap("roundtrip-bench-signal", cpus) as cap:
        worker = WorkerProcess(command=cap.command(command))
        try:
            worker.wait_serving(timeout=300)
            asyncio.run(closed_loop(worker.port, body, 16, 3.0))  # warm
            capacity = asyncio.run(closed_loop(worker.port, body, 16, step_s))["requests_per_s"]
            print(f"capacity {capacity:.0f} OK/s at {cpus} CPU", flush=True)
            steps = []
            for share in shares:
                result = asyncio.run(step(worker, body, share * capacity, step_s, cpus))
                result["share"] = share
                steps.append(result)
                print(json.dumps(result), flush=True)
                wait_for(lambda: worker.metric("roundtrip_inflight_requests") == 0, "drained", 120)
            throttled = cap.throttled_s()
        finally:
            worker.terminate()
    return {
        "capacity_ok_per_s": round(capacity, 1),
        "throttled_s": round(throttled, 1),
        "steps": steps,
    }


def table(report: dict[str, Any]) -> str:
    """The report as docs/autoscaling.md shows it: one row per pod size and step."""
    rows = [
        "| CPU limit | load (x capacity) | OK/s | p50 ms | p99 ms | busy | in flight | "
        "in flight (gauge) | queue / compute | CPU / limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cpus, pod in report["pods"].items():
        for step in pod["steps"]:
            rows.append(
                f"| {cpus} | {step['share']} | {step['ok_per_s']:.0f} | {step['p50_ms']} | "
                f"{step['p99_ms']} | {step.get('busy', '')} | {step['inflight']} | "
                f"{step['inflight_sampled']} | "
                f"{step['queue_to_compute']} | {step['cpu']} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", default="2,1,0.5,0.25", help="the worker's CFS quotas, in turn")
    parser.add_argument("--step-s", type=float, default=12.0)
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--shares", default=",".join(map(str, SHARES)))
    parser.add_argument("--table", action="store_true", help="print the last run's table")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())["signal"][args.workload]))
        return
    shares = [float(share) for share in args.shares.split(",")]
    pods = {
        cpus: ramp(float(cpus), args.step_s, args.workload, shares) for cpus in args.cpus.split(",")
    }
    report = {
        "command": "python -m bench.signal " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "workload": args.workload,
        "step_s": args.step_s,
        "pods": pods,
    }
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs.setdefault("signal", {})[args.workload] = report
    RESULTS.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
