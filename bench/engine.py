"""The engine alone: rows per second through ``Engine.run``, no RPC, batches of 64.

    python -m bench.engine                 # 5 rounds -> docs/bench/engine.json and a table
    python -m bench.engine --rounds 1      # a smoke run
    python -m bench.engine --split         # where a proven W2 batch's time goes (below)

For W1, W2 and W3 (:data:`bench.checks.WORKLOADS`), with fresh seeds (64 different ones a
batch) and a repeated seed (one seed, its parameters cached after the first batch), the
worker's engine as configured by default (batched programs where they prove eager's bits)
beside the same engine with every batch looped (``batched_max_bytes`` 0), and beside the
bound: the arithmetic alone as one plain ``jax.jit`` batched program (parameters given;
for fresh seeds, drawn in the same program), which is not bit-exact and serves nothing.
Every engine answer of the first batch is checked against the eager reference.

The rounds alternate the three; a figure is the median over rounds of each round's median
batch, in microseconds per row.

``--split`` times the parts of one W2 batch of 64 cached parameter sets (the bulk path's
case: 64 seeds that repeat): the Python that stacks the operands, the proven executable's
steps 1-4, its reductions as proven (each request's sums reduced on their own, ``sliced``),
and the same sums as one row-wise reduce (which does not give eager's bits here: the
proof refuses it), with how many of the 64 rows' sums the row-wise reduce gets right, and
how many four orders chosen to look like a vectorised reduce get right.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.checks import WORKLOADS
from bench.report import write_page_table
from roundtrip.server.config import WorkerConfig
from roundtrip.server.engine.engine import Engine
from roundtrip.server.numerics.programs import seed_operand
from roundtrip.server.numerics.reference import eager_round_trip, same_answer
from roundtrip.server.values import RoundTripInput

BATCH = 64
OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "engine.json"
TABLE_START = "<!-- python -m bench.engine writes the table below from docs/bench/engine.json -->"
TABLE_END = "<!-- end of bench.engine's table -->"


def engine(batched: bool, max_batch_size: int = BATCH) -> Engine:
    """The worker's engine as its defaults configure it, with batches of ``max_batch_size``
    (``batched`` False: every batch looped)."""
    config = WorkerConfig()
    return Engine(
        max_compiled=config.max_compiled,
        max_batch_size=max_batch_size,
        max_param_cache_bytes=config.max_param_cache_bytes,
        batched_max_bytes=config.batched_max_bytes if batched else 0,
    )


def inputs(workload: str, seeds: str) -> list[RoundTripInput]:
    width, features = WORKLOADS[workload]
    rng = np.random.default_rng(7)
    drawn = [int(s) for s in rng.integers(-(2**40), 2**40, BATCH)]
    chosen = drawn if seeds == "fresh" else [drawn[0]] * BATCH
    return [
        RoundTripInput(seed, rng.standard_normal(width).astype(np.float32), features)
        for seed in chosen
    ]


def bound(items: list[RoundTripInput], seeds: str) -> Callable[[], Any]:
    """The arithmetic alone, one plain jit: draw (fresh seeds) or take the parameters, then
    both matmuls and the three numbers per row."""
    width, features = items[0].x.shape[-1], items[0].features
    xs = jnp.asarray(np.stack([item.x for item in items]))
    keys = jnp.asarray([seed_operand(item.seed) for item in items])

    def params(seed: Any) -> tuple[Any, Any]:
        model = nnx.Linear(width, features, rngs=nnx.Rngs(jax.random.key(seed)))
        _, state = nnx.split(model)
        bias, kernel = jax.tree.leaves(state)
        return kernel, bias

    def answers(kernel: Any, bias: Any, x: Any) -> Any:
        orig = x @ kernel + bias
        merged = x @ kernel + bias
        return jnp.stack([orig.sum(), merged.sum(), jnp.max(jnp.abs(orig - merged))])

    if seeds == "fresh":
        run = jax.jit(lambda k, x: jax.vmap(lambda s, r: answers(*params(s), r))(k, x))
        return lambda: run(keys, xs).block_until_ready()
    kernel, bias = jax.jit(params)(keys[0])
    given = jax.jit(lambda k, b, x: jax.vmap(functools.partial(answers, k, b))(x))
    return lambda: given(kernel, bias, xs).block_until_ready()


def per_row_us(run: Callable[[], Any], calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / BATCH * 1e6


def measure(rounds: int, calls: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for workload in WORKLOADS:
        for seeds in ("fresh", "repeated"):
            items = inputs(workload, seeds)
            batched, looped = engine(batched=True), engine(batched=False)
            for one in (batched, looped):
                for got, item in zip(one.run(items)[:8], items[:8], strict=False):
                    assert same_answer(got, eager_round_trip(item.seed, item.x, item.features))
                one.run(items)  # a repeated seed's parameters are cached from here
            runs: dict[str, Callable[[], Any]] = {
                "batched": functools.partial(batched.run, items),
                "looped": functools.partial(looped.run, items),
                "bound": bound(items, seeds),
            }
            for run in runs.values():
                run()
            figures: dict[str, list[float]] = {name: [] for name in runs}
            for number in range(rounds):
                order = list(runs) if number % 2 == 0 else list(reversed(runs))
                for name in order:
                    figures[name].append(per_row_us(runs[name], calls))
            medians = {name: round(statistics.median(v), 2) for name, v in figures.items()}
            medians["batched_programs_proven"] = batched.stats.batched_proven
            medians["batched_programs_refused"] = batched.stats.batched_refused
            results[f"{workload} {seeds} seeds"] = medians
            print(f"{workload} {seeds:8} {medians}", flush=True)
    return results


def in_lanes(lanes: int, rows: Any) -> Any:
    """Each row summed in ``lanes`` running sums, which are then added in halves: an order a
    vectorised reduce might take, tried against eager's sums (``--split``)."""
    width = rows.shape[-1]
    chunks = rows.reshape(rows.shape[0], width // lanes, lanes)
    acc = chunks[:, 0]
    for step in range(1, width // lanes):
        acc = acc + chunks[:, step]
    while acc.shape[1] > 1:
        half = acc.shape[1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc[:, 0]


def split(calls: int = 300) -> dict[str, Any]:
    """Microseconds per row of each part of a proven W2 batch from cached sets (``--split``)."""
    from roundtrip.server.engine.engine import param_key

    items = inputs("W2", "fresh")
    one = engine(batched=True)
    for _ in range(3):  # the second run caches the sets, the third runs from them
        one.run(items)
    signature = items[0].signature
    width, features = WORKLOADS["W2"]
    found = [one.params.get(param_key(item.seed, width, features)) for item in items]
    compiled = one.executable(signature, one.bucket_for(BATCH), source="rows")
    operands = (compiled._parameters(items, found), compiled._xs(items), np.int32(BATCH))
    outs = jax.block_until_ready(compiled._outputs(*operands))
    rowwise = compiled.with_reductions("rowwise")
    proven = np.asarray(compiled._orig_reductions(*outs[:3]))
    unproven = np.asarray(rowwise._orig_reductions(*outs[:3]))
    parts = {
        "program": compiled.reductions,
        "engine run": per_row_us(functools.partial(one.run, items), calls),
        "operands (Python)": per_row_us(lambda: compiled._parameters(items, found), calls),
        "steps 1-4": per_row_us(lambda: jax.block_until_ready(compiled._outputs(*operands)), calls),
        "reductions as proven": per_row_us(
            lambda: np.asarray(compiled._orig_reductions(*outs[:3])), calls
        ),
        "reductions row-wise (not exact)": per_row_us(
            lambda: np.asarray(rowwise._orig_reductions(*outs[:3])), calls
        ),
        "rows whose sum the row-wise reduce gets right": int((proven[0] == unproven[0]).sum()),
    }
    for lanes in (4, 8, 16, 32):
        summed = np.asarray(jax.jit(functools.partial(in_lanes, lanes))(outs[0]))
        parts[f"rows right summed in {lanes} lanes, then halves"] = int((proven[0] == summed).sum())
    for name, value in parts.items():
        print(f"{name}: {value if isinstance(value, (int, str)) else round(value, 2)}")
    return parts


def table(results: dict[str, Any]) -> str:
    lines = [
        "| batch of 64 | batched (us/row) | looped (us/row) | bound (us/row) | batched / bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        ratio = row["batched"] / row["bound"]
        lines.append(
            f"| {name} | {row['batched']} | {row['looped']} | {row['bound']} | {ratio:.1f} x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="batches timed per round")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--split", action="store_true", help="time a W2 batch's parts only")
    args = parser.parse_args(argv)
    if args.split:
        split()
        return 0
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "backend": jax.default_backend(),
        "command": "python -m bench.engine",
        "workloads": measure(args.rounds, args.calls),
    }
    rendered = table(results["workloads"])
    print(rendered)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.out == OUT:
        write_page_table(rendered, start=TABLE_START, end=TABLE_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
