"""Batched programs: a batch runs as one program (every request's draws and matmuls at
once) only where that program has proven eager's bits on this device; one that does not
is refused, counted and logged once, and the looped program answers instead, exact."""

from __future__ import annotations

import logging
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from reference import numbers, reference

from roundtrip.server.engine.engine import Engine
from roundtrip.server.engine.proof import PROOF_REQUESTS, proof_inputs
from roundtrip.server.numerics import programs
from roundtrip.server.values import RoundTripInput, ShapeSignature

MIB = 1 << 20


def batch(shape: tuple[int, ...], features: int, seeds: list[int]) -> list[RoundTripInput]:
    rng = np.random.default_rng(len(seeds) + features)
    return [
        RoundTripInput(seed, rng.standard_normal(shape).astype(np.float32), features)
        for seed in seeds
    ]


def assert_exact(engine: Engine, items: list[RoundTripInput]) -> None:
    for item, got in zip(items, engine.run(items), strict=True):
        assert np.array_equal(numbers(got), reference(item.seed, item.x, item.features))


@pytest.mark.parametrize(
    ("shape", "features", "seeds"),
    [
        ((3,), 4, list(range(8))),  # fresh seeds: drawn inside the program
        ((64,), 64, [5, 6, 5, 6, 7, 5, 8, 6]),  # small sets, cached as host rows
        ((2, 255), 256, [9, 9, 9, 10]),  # large sets, shared on the device
        ((4, 16), 8, [-1, 2**63 - 1, -(2**63), 2**32 + 5]),  # rank 2, edge seeds
    ],
)
def test_a_proven_batched_program_serves_with_eager_bits(
    shape: tuple[int, ...], features: int, seeds: list[int]
) -> None:
    engine = Engine(
        max_compiled=16, max_batch_size=8, max_param_cache_bytes=64 * MIB, batched_max_bytes=MIB
    )
    items = batch(shape, features, seeds)
    assert_exact(engine, items)
    assert_exact(engine, items)  # again: cached parameters where they repeat
    assert engine.stats.batched_proven >= 1
    assert engine.stats.batched_refused == 0
    served = [key for key in engine._cache if key[1] > 1]
    assert served
    assert all(engine._cache[key].batched for key in served)


def test_batches_over_batched_max_bytes_run_looped() -> None:
    """(64 + 1) * 64 * 4 bytes a request: a batch of 4 is 66,560 bytes."""
    engine = Engine(max_compiled=8, max_batch_size=4, batched_max_bytes=66_559)
    items = batch((64,), 64, [1, 2, 3, 4])
    assert_exact(engine, items)
    assert not engine.programs.may_batch(items[0].signature, 4)
    assert (engine.stats.batched_proven, engine.stats.batched_refused) == (0, 0)
    assert not engine.executable(items[0].signature, 4).batched


@pytest.fixture
def reordered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batched program known to accumulate in another order than eager's: each row's
    matmul summed from the last input column to the first."""
    original = programs.batch_from_seeds

    def last_column_first(
        seeds: Any, xs: Any, count: Any, *, features: int, emit_params: bool = False, **kw: Any
    ) -> Any:
        if not kw.get("batched"):
            return original(seeds, xs, count, features=features, emit_params=emit_params)
        _, _, bias, kernel = original(
            seeds, xs, count, features=features, emit_params=True, batched=True
        )
        flipped = jnp.einsum("bi,bij->bj", xs[:, ::-1], kernel[:, ::-1, :]) + bias
        return (flipped, flipped, bias, kernel) if emit_params else (flipped, flipped)

    monkeypatch.setattr(programs, "batch_from_seeds", last_column_first)


def test_a_program_whose_proof_fails_is_refused_counted_logged_once_and_never_serves(
    reordered: None, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(max_compiled=1, max_batch_size=4, batched_max_bytes=MIB)
    items = batch((64,), 8, [11, 12, 13, 14])
    with caplog.at_level(logging.WARNING, logger="roundtrip.server.engine.proof"):
        assert_exact(engine, items)
        assert engine.stats.batched_refused == 1
        assert_exact(engine, batch((3,), 4, [1, 2, 3, 4]))  # refused too; evicts the first
        assert_exact(engine, items)  # compiled again: neither proven nor logged again
    assert engine.stats.batched_refused == 2
    assert not engine.executable(items[0].signature, 4).batched
    refusals = [r for r in caplog.records if r.getMessage().startswith("batched program refused")]
    assert [r.signature for r in refusals] == [  # type: ignore[attr-defined]  # extra=
        str(items[0].signature),
        str(ShapeSignature((3,), "float32", 4)),
    ]
    assert "outputs differ" in refusals[0].detail  # type: ignore[attr-defined]


def test_the_proof_checks_every_row_position_with_distinct_requests() -> None:
    signature = ShapeSignature((3,), "float32", 4)
    inputs = proof_inputs(signature, 64, "seed")
    assert len(inputs) == 64
    assert len({id(item) for item in inputs}) == PROOF_REQUESTS
    assert any(np.abs(item.x).max() > 1e3 for item in inputs)  # large outputs too
    assert {item.seed for item in proof_inputs(signature, 8, "shared")} == {0}
