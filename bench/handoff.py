"""What a hand-off per batch costs a grpc.aio unary server, by where the work goes.

    python -m bench.handoff --rounds 2 --duration 6   # -> docs/bench/handoff.json

Three minimal servers answer RoundTrip with a constant, each batching the calls that
arrived while the previous batch was out, as the worker's batcher does. They differ only
in where a batch goes before its futures are resolved on the event loop:

* ``loop``: nowhere (one loop iteration): the ceiling of a batching handler;
* ``thread``: a one-thread executor that does nothing (the worker's compute lanes);
* ``process``: a child process over a pipe that echoes the batch's size back, the loop
  reading the pipe as one more file descriptor.

Each runs on asyncio's standard loop and on uvloop; h2load drives W2's body (8
connections x 16 streams), every server started afresh, the order flipped each round.
No JAX here: this measures the hand-off alone, for the design of the compute lanes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.run import OUT, cases, h2load, machine
from roundtrip.server.eventloop import EVENT_LOOPS, loop_factory
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

MODES = ("loop", "thread", "process")
CONSTANT = pb.RoundTripResponse(orig_sum=1.0, merged_sum=1.0, max_abs_diff=0.0)


def _echo(connection: Connection, servers_end: Connection) -> None:
    """The child process: answers every batch with its size, and exits when the server
    does (its end of the pipe closed: killed servers leave no echo behind)."""
    servers_end.close()  # the fork's copy: else the pipe never reads as closed
    try:
        while True:
            connection.send_bytes(connection.recv_bytes())
    except EOFError:
        return


class HandOffServicer(pb_grpc.RoundTripServiceServicer):
    def __init__(self, mode: str, child: Connection | None) -> None:
        self.mode = mode
        self.child = child
        self.queued: list[asyncio.Future[pb.RoundTripResponse]] = []
        self.arrival = asyncio.Event()
        self.executor = ThreadPoolExecutor(1)
        self.reply: asyncio.Future[None] | None = None
        if child is not None:
            asyncio.get_running_loop().add_reader(child.fileno(), self._replied)

    def _replied(self) -> None:
        assert self.child is not None
        assert self.reply is not None
        self.child.recv_bytes()
        self.reply.set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queued:
                self.arrival.clear()
                await self.arrival.wait()
                continue
            batch, self.queued = self.queued, []
            if self.mode == "thread":
                await loop.run_in_executor(self.executor, len, batch)
            elif self.mode == "process":
                assert self.child is not None
                self.reply = loop.create_future()
                self.child.send_bytes(struct.pack("<i", len(batch)))
                await self.reply
            else:
                await asyncio.sleep(0)
            for future in batch:
                future.set_result(CONSTANT)

    async def RoundTrip(self, request: Any, context: Any) -> pb.RoundTripResponse:  # noqa: N802
        future: asyncio.Future[pb.RoundTripResponse] = asyncio.get_running_loop().create_future()
        self.queued.append(future)
        self.arrival.set()
        return await future


async def serve(mode: str, child: Connection | None) -> None:
    server = grpc.aio.server()
    servicer = HandOffServicer(mode, child)
    pb_grpc.add_RoundTripServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runner = asyncio.create_task(servicer.run())
    print(json.dumps({"event": "listening", "port": port}), file=sys.stderr, flush=True)
    try:
        await server.wait_for_termination()
    finally:
        runner.cancel()


def measure(mode: str, event_loop: str, body: pb.RoundTripRequest, duration: int) -> float:
    """Start one server (a subprocess), drive it with h2load, stop it: its req/s."""
    command = [sys.executable, "-m", "bench.handoff", "serve", mode, "--event-loop", event_loop]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        port = 0
        for line in process.stderr:
            if line.startswith("{"):
                port = int(json.loads(line)["port"])
                break
        threading.Thread(target=process.stderr.read, daemon=True).start()
        return h2load(port, body, duration=duration, clients=8, streams=16)["rps"]
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("mode", choices=MODES)
    serve_parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=6)
    args = parser.parse_args()
    if args.command == "serve":
        child = None
        if args.mode == "process":  # before gRPC starts its threads
            child, theirs = multiprocessing.Pipe()
            context = multiprocessing.get_context("fork")
            context.Process(target=_echo, args=(theirs, child), daemon=True).start()
            theirs.close()
        with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
            runner.run(serve(args.mode, child))
        return
    body = cases(64, 64, 1, check=False)[0].request
    runs: dict[str, list[float]] = {}
    kinds = [(mode, loop) for loop in EVENT_LOOPS for mode in MODES]
    for round_ in range(args.rounds):
        for mode, loop in kinds if round_ % 2 == 0 else kinds[::-1]:
            rps = measure(mode, loop, body, args.duration)
            runs.setdefault(f"{mode} on {loop}", []).append(rps)
            print(f"{mode} on {loop}", round(rps), flush=True)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    report = {
        "runs": runs,
        "medians": medians,
        "machine": machine("h2load on the same cores"),
        "rounds": args.rounds,
        "duration_s": args.duration,
    }
    (OUT / "handoff.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
