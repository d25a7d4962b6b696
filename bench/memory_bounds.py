"""Memory under a careless or hostile caller, with default settings: RSS above the idle level.

    python -m bench.memory_bounds                 # both scenarios -> docs/bench/memory_bounds.json
    python -m bench.memory_bounds --calibrate     # -> docs/bench/memory_calibration.json

1. **Unread stream**: one RoundTripStream sends 6,000 requests whose answers
   carry both outputs (64 x 1024 -> 4096: 2 MiB an answer) and never reads an
   answer. Before answers held their slot until written, RSS grew by 2 MiB an
   answer (12 GiB for 6,000).
2. **Burst of large requests**: 64 concurrent 16 MiB requests (x 4096 x 1024
   float32, features 1024), twice. Each ends OK (bit-identical to the engine
   run here) or RESOURCE_EXHAUSTED; RSS is sampled every 50 ms, and the
   worker must be SERVING and exact afterwards.

``--calibrate`` sends one and then eight concurrent requests of several
shapes to a worker with an unbounded budget and prints each peak (``VmHWM``
after resetting it) against ``admission.working_set_bytes``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.harness import OUT, machine
from roundtrip.client.channel import channel_options
from roundtrip.client.messages import build_request, parse_response
from roundtrip.server.engine.engine import Engine
from roundtrip.server.pipeline.admission import working_set_bytes
from roundtrip.server.pipeline.validation import RequestLimits, weigh
from roundtrip.server.values import RoundTripInput
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc
from support.workers import WorkerProcess

MIB = 1024 * 1024


class PeakRss:
    """Samples a worker's RSS every 50 ms in a thread, keeping the largest."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.worker.status_mib("VmRSS"))
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def exact(stub: pb_grpc.RoundTripServiceStub) -> bool:
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    got = parse_response(stub.RoundTrip(build_request(5, x, 64), timeout=60)).as_list()
    [want] = Engine(max_compiled=2).run([RoundTripInput(5, x, 64)])
    return bool(got == want.as_list())


def unread_stream(worker: WorkerProcess, count: int) -> dict[str, Any]:
    x = np.linspace(-1, 1, 64 * 1024, dtype=np.float32).reshape(64, 1024)
    requests = (
        pb.RoundTripStreamRequest(id=i, request=build_request(i, x, 4096, return_outputs=True))
        for i in range(count)
    )
    answered = 'roundtrip_requests_total{code="OK",method="RoundTripStream"}'
    idle = worker.status_mib("VmRSS")
    with (
        grpc.insecure_channel(worker.target, channel_options()) as channel,
        PeakRss(worker) as rss,
    ):
        call = pb_grpc.RoundTripServiceStub(channel).RoundTripStream(requests, timeout=600)
        last, since = -1.0, time.monotonic()
        while time.monotonic() - since < 10:  # until nothing more is computed for 10 s
            time.sleep(1)
            now = worker.metric(answered)
            if now != last:
                last, since = now, time.monotonic()
        computed = last
        held = worker.metric("roundtrip_admitted_bytes")
        call.cancel()
        time.sleep(2)
        stub = pb_grpc.RoundTripServiceStub(channel)
        still_exact = exact(stub)
    return {
        "requests_sent_unread": count,
        "answers_computed": computed,
        "idle_rss_mib": round(idle, 1),
        "peak_rss_above_idle_mib": round(rss.peak - idle, 1),
        "admitted_bytes_while_blocked_mib": round(held / MIB, 1),
        "admitted_bytes_after_cancel": worker.metric("roundtrip_admitted_bytes"),
        "serving_and_exact_after": still_exact and worker.health() == 1,
    }


def burst(worker: WorkerProcess, concurrent: int, rounds: int) -> dict[str, Any]:
    x = np.random.default_rng(3).standard_normal((4096, 1024)).astype(np.float32)
    request = build_request(0, x, 1024)
    [want] = Engine(max_compiled=2).run([RoundTripInput(0, x, 1024)])
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    idle = worker.status_mib("VmRSS")
    with (
        grpc.insecure_channel(worker.target, channel_options()) as channel,
        PeakRss(worker) as rss,
    ):
        stub = pb_grpc.RoundTripServiceStub(channel)

        def call() -> None:
            try:
                got = parse_response(stub.RoundTrip(request, timeout=300)).as_list()
                outcome = "OK" if got == want.as_list() else "WRONG"
            except grpc.RpcError as error:
                outcome = error.code().name
            with lock:
                outcomes[outcome] += 1

        for _ in range(rounds):
            threads = [threading.Thread(target=call) for _ in range(concurrent)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        still_exact = exact(stub)
    return {
        "requests": concurrent * rounds,
        "concurrent": concurrent,
        "request_mib": round(request.ByteSize() / MIB, 1),
        "estimated_working_set_mib": round(working_set_bytes(weigh(request, unlimited())) / MIB, 1),
        "outcomes": dict(outcomes),
        "idle_rss_mib": round(idle, 1),
        "peak_rss_above_idle_mib": round(rss.peak - idle, 1),
        "max_inflight_bytes_mib": worker.metric("roundtrip_admitted_bytes_limit") / MIB,
        "serving_and_exact_after": still_exact and worker.health() == 1,
    }


def unlimited() -> RequestLimits:
    return RequestLimits(1 << 40, 1 << 40, 1 << 40, 1 << 40)


CALIBRATION = [
    ((4096, 1024), 1024, False),
    ((4096, 1024), 1024, True),
    ((16, 1024), 16384, False),
    ((4, 8191), 8192, False),
    ((65536, 16), 64, True),
    ((1024, 4096), 4096, True),
]


def calibrate() -> list[dict[str, Any]]:
    worker = WorkerProcess(
        "--warmup-shapes", "3:4", "--max-inflight-bytes", str(64 << 30), "--audit-fraction", "0"
    )
    rows = []
    try:
        worker.wait_serving()
        with grpc.insecure_channel(worker.target, channel_options()) as channel:
            stub = pb_grpc.RoundTripServiceStub(channel)
            for shape, features, outputs in CALIBRATION:
                for concurrent in (1, 8):
                    rng = np.random.default_rng(concurrent)
                    requests = [
                        build_request(
                            seed,
                            rng.standard_normal(shape).astype(np.float32),
                            features,
                            return_outputs=outputs,
                        )
                        for seed in range(concurrent)
                    ]
                    stub.RoundTrip(requests[0], timeout=600)  # compiled before measuring
                    threads = [
                        threading.Thread(target=stub.RoundTrip, args=(r,), kwargs={"timeout": 600})
                        for r in requests
                    ]
                    time.sleep(0.5)
                    Path(f"/proc/{worker.process.pid}/clear_refs").write_text("5")  # reset VmHWM
                    before = worker.status_mib("VmRSS")
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    peak = worker.status_mib("VmHWM") - before
                    estimate = working_set_bytes(weigh(requests[0], unlimited())) / MIB
                    row = {
                        "x": list(shape),
                        "features": features,
                        "return_outputs": outputs,
                        "concurrent": concurrent,
                        "peak_above_before_mib": round(peak, 1),
                        "estimate_mib": round(estimate * concurrent, 1),
                        "ratio": round(peak / (estimate * concurrent), 2),
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        worker.terminate(120)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--stream-requests", type=int, default=6000)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="default: docs/bench/memory_bounds.json (or _calibration)")
    args = parser.parse_args()
    name = "memory_calibration.json" if args.calibrate else "memory_bounds.json"
    out = Path(args.out) if args.out else OUT / name
    if args.calibrate:
        report: dict[str, Any] = {"calibration": calibrate()}
    else:
        report = {}
        for name in ("unread_stream", "burst"):
            worker = WorkerProcess("--warmup-shapes", "3:4,64:64")  # every other knob default
            try:
                worker.wait_serving()
                if name == "unread_stream":
                    report[name] = unread_stream(worker, args.stream_requests)
                else:
                    report[name] = burst(worker, args.burst, args.rounds)
                print(json.dumps({name: report[name]}), flush=True)
            finally:
                worker.terminate(120)
    report["machine"] = machine("client and worker on the same cores")
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
