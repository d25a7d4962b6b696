"""Start-up work before the worker reports SERVING: compile, then prove exactness.

Compiles every batch size of each configured warm-up shape, then checks on
the worked example and a few awkward inputs (width 1, extreme seeds, float16,
rank 2, an output of 65,536 elements, and a shape of each parameter-cache tier,
drawn then reused) that the engine's answers, alone and batched, equal the eager
reference steps bit for bit on this backend. A mismatch is fatal: a worker that
cannot prove its answers must not take traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import threading
import time
from collections.abc import AsyncIterator, Mapping

import numpy as np

from roundtrip.server.engine.engine import Engine
from roundtrip.server.numerics.reference import eager_round_trip, same_answer
from roundtrip.server.values import RoundTripInput, ShapeSignature

log = logging.getLogger(__name__)

WORKED_EXAMPLE = RoundTripInput(seed=0, x=np.array([1.0, 2.0, 3.0], np.float32), features=4)
WORKED_EXAMPLE_ANSWER = (-4.2219334, -4.2219334, 0.0)


class SelfCheckFailed(RuntimeError):
    """The compiled path and the eager reference disagree on this backend."""


class WarmUpAborted(RuntimeError):
    """The worker was asked to stop before warm-up finished."""


def self_check_inputs(engine: Engine) -> list[RoundTripInput]:
    """Awkward inputs, and (when the engine caches parameters) a shape of each cache tier,
    so every path is checked: from the seed, drawn into the cache, taken from the cache.
    """
    rng = np.random.default_rng(20261125)
    inputs = [
        WORKED_EXAMPLE,
        RoundTripInput(-1, rng.standard_normal((2, 1)).astype(np.float32), 1),
        RoundTripInput(2**63 - 1, rng.standard_normal(64).astype(np.float32), 64),
        RoundTripInput(2**32 + 5, rng.standard_normal((3, 7)).astype(np.float16), 5),
        RoundTripInput(-(2**63), rng.standard_normal(1).astype(np.float32), 3),
        # an output of 65,536 elements: XLA's CPU reduce kernels change their order with
        # size and with where their input lives, so a batch's sums must be eager's here too
        RoundTripInput(11, rng.standard_normal((128, 4)).astype(np.float32), 512),
    ]
    for cached in (
        RoundTripInput(2**32 + 7, rng.standard_normal((2, 255)).astype(np.float32), 256),
        RoundTripInput(-3, rng.standard_normal((2, 3, 40)).astype(np.float16), 48),
    ):
        if engine.caches_params(cached.signature):  # one of each tier when the cache is on
            inputs += [cached, cached]  # drawn, then cached: the second finds them
    return inputs


#: The fingerprint's probes (seed, x's shape, features): multi-row inputs and several widths,
#: so that code generation shows in the bits (the worked example alone does not: it gave the
#: same bits under AVX and AVX2 here, while (3, 2, 4) did not).
PROBES = (
    (5, (3, 2, 4), 2),
    (12345, (8, 64), 64),
    (-7, (4, 100), 33),
    (2**31 - 1, (2, 3, 256), 128),
)


def probe_inputs() -> list[RoundTripInput]:
    rng = np.random.default_rng(20261126)
    return [
        RoundTripInput(seed, rng.standard_normal(shape).astype(np.float32), features, True)
        for seed, shape, features in PROBES
    ]


class Steps:
    """One lane's warm-up, step by step: each step says what it does (what the heartbeat
    reports), and a worker asked to stop (SIGTERM sets ``stop``) gives up between two.

    >>> steps = Steps()
    >>> steps.start("compiling 3:4 at batch size 1"); steps.now
    'compiling 3:4 at batch size 1'
    >>> steps.stop.set()
    >>> try:
    ...     steps.start("self-check input 1 of 9")
    ... except WarmUpAborted as stopped:
    ...     print(stopped)
    stopped before self-check input 1 of 9
    """

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop if stop is not None else threading.Event()
        self.now = "starting"
        self.since = time.monotonic()

    def start(self, step: str) -> None:
        if self.stop.is_set():
            raise WarmUpAborted(f"stopped before {step}")
        self.now, self.since = step, time.monotonic()


#: Seconds between two "warming up" lines: a single compilation or the self-check can take
#: tens of seconds on a loaded node, and an operator watching the logs should see it move.
HEARTBEAT_S = 5.0


@contextlib.asynccontextmanager
async def heartbeat(
    lanes: Mapping[str, Steps], every_s: float = HEARTBEAT_S
) -> AsyncIterator[None]:
    """While the block runs, log every ``every_s`` seconds what each lane's warm-up does."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            log.info(
                "warming up",
                extra={
                    "lanes": {
                        name: {"step": steps.now, "seconds": round(now - steps.since, 1)}
                        for name, steps in lanes.items()
                    }
                },
            )

    task = asyncio.create_task(beat(), name="warm-up heartbeat")
    try:
        yield
    finally:
        task.cancel()


def fingerprint(engine: Engine, steps: Steps | None = None) -> str:
    """A short hash of the bits the engine answers :data:`PROBES` with (sums and outputs):
    equal on two workers when their code generation gives the same bits."""
    digest = hashlib.sha256()
    steps = steps or Steps()
    probes = probe_inputs()
    for index, item in enumerate(probes):
        steps.start(f"fingerprint probe {index + 1} of {len(probes)}")
        [answer] = engine.run([item])
        assert answer.orig_out is not None
        assert answer.merged_out is not None
        digest.update(struct.pack("<3f", *answer.as_list()))
        digest.update(np.ascontiguousarray(answer.orig_out, "<f4").tobytes())
        digest.update(np.ascontiguousarray(answer.merged_out, "<f4").tobytes())
    return digest.hexdigest()[:16]


def compile_shapes(engine: Engine, pairs: list[tuple[int, int]], steps: Steps | None = None) -> int:
    """Compile every batch bucket for 1-D float32 x of each (width, features), one step
    each: a SIGTERM during a long warm-up is obeyed within one compilation."""
    steps = steps or Steps()
    count = 0
    started = time.perf_counter()
    for index, (width, features) in enumerate(pairs):
        signature = ShapeSignature((width,), "float32", features)
        for batch_size in engine.buckets:
            steps.start(f"compiling {width}:{features} at batch size {batch_size}")
            engine.prepare(signature, batch_size, keep=True)
            count += 1
        log.info(
            "warm-up: compiled",
            extra={
                "shape": f"{width}:{features}",
                "shapes": f"{index + 1} of {len(pairs)}",
                "batch_sizes": len(engine.buckets),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
    return count


def self_check(engine: Engine, steps: Steps | None = None) -> int:
    """Compare engine and eager reference on :func:`self_check_inputs`; raise on any bit."""
    steps = steps or Steps()
    checked = 0
    inputs = self_check_inputs(engine)
    started = time.perf_counter()
    for index, item in enumerate(inputs):
        steps.start(f"self-check input {index + 1} of {len(inputs)}")
        expected = eager_round_trip(item.seed, item.x, item.features)
        alone = engine.run([item])[0]
        # exercises the batched executable too, when batching is on
        batched = engine.run([item, item]) if engine.max_batch_size > 1 else []
        for got in [alone, *batched]:
            if not same_answer(got, expected):
                raise SelfCheckFailed(
                    f"engine and eager reference differ for seed={item.seed}, "
                    f"x {item.x.dtype}{list(item.x.shape)}, features={item.features}: "
                    f"{got} != {expected}"
                )
            checked += 1
    worked = engine.run([WORKED_EXAMPLE])[0]
    if not np.allclose(
        (worked.orig_sum, worked.merged_sum, worked.max_abs_diff), WORKED_EXAMPLE_ANSWER, atol=1e-6
    ):
        raise SelfCheckFailed(f"worked example gave {worked}, SPEC.md says {WORKED_EXAMPLE_ANSWER}")
    log.info(
        "warm-up: self-checked",
        extra={
            "inputs": len(inputs),
            "answers": checked,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return checked


def warm_up(engine: Engine, pairs: list[tuple[int, int]], steps: Steps | None = None) -> str:
    """Compile the warm-up shapes, run the self-check, and return the engine's numerics
    :func:`fingerprint`; logs where it is after each shape and each phase. A worker told to
    stop while it warms up (``steps.stop``) stops within one compilation or one self-check
    input."""
    started = time.perf_counter()
    compiled = compile_shapes(engine, pairs, steps)
    checked = self_check(engine, steps)
    bits = fingerprint(engine, steps)
    log.info(
        "warm-up done",
        extra={
            "compiled": compiled,
            "self_checked": checked,
            "fingerprint": bits,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return bits
