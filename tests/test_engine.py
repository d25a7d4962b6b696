"""The engine on its own: exactness at the edges, buckets, the bounded cache."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import reference_with_outputs

from roundtrip.server.engine.engine import Engine, batch_buckets
from roundtrip.server.numerics.executables import CompiledInit, merged_sums
from roundtrip.server.numerics.fencing import isolate_primitives
from roundtrip.server.numerics.programs import orig_reductions, round_trip, seed_operand
from roundtrip.server.values import RoundTripAnswer, RoundTripInput, ShapeSignature


def answer(result: RoundTripAnswer) -> list[float]:
    return [result.orig_sum, result.merged_sum, result.max_abs_diff]


# Inputs where a plain jax.jit of the reference steps is known to differ from eager on CPU.
FUSION_SENSITIVE = [
    (0, np.array([[-0.65179116], [-0.17471729], [1.663724]], np.float32), 4),
    (0, np.array([0.3], np.float32), 64),
    (2**32 + 5, np.array([[0.5], [-1.25]], np.float64), 1),
]


@pytest.mark.parametrize(("seed", "x", "features"), FUSION_SENSITIVE)
def test_engine_equals_reference_where_plain_jit_does_not(
    seed: int, x: np.ndarray, features: int
) -> None:
    engine = Engine(max_compiled=4, max_batch_size=4)
    expected, orig_out, merged_out = reference_with_outputs(seed, x, features)
    alone = engine.run([RoundTripInput(seed, x, features, with_outputs=True)])[0]
    assert np.array_equal(answer(alone), expected)
    assert alone.orig_out is not None
    assert np.array_equal(alone.orig_out, orig_out)
    assert alone.merged_out is not None
    assert np.array_equal(alone.merged_out, merged_out)
    batched = engine.run([RoundTripInput(seed, x, features)] * 3)
    assert all(np.array_equal(answer(r), expected) for r in batched)


def test_plain_jit_really_differs_on_one_of_those_inputs() -> None:
    """Keeps the fences honest: if XLA stops differing, this says the workaround is moot."""
    differs = 0
    for seed, x, features in FUSION_SENSITIVE:
        plain = jax.jit(functools.partial(round_trip, features=features))
        orig_out, _ = plain(seed_operand(seed), x)
        expected = reference_with_outputs(seed, x, features)
        differs += not np.array_equal(np.asarray(orig_out), expected[1]) or float(
            orig_out.sum()
        ) != float(np.float32(expected[0][0]))
    assert differs >= 1


def test_isolate_primitives_keeps_values() -> None:
    f = isolate_primitives(lambda a, b: ((a * 2.0 + b) / 3.0).sum())
    x = np.arange(6, dtype=np.float32)
    assert float(jax.jit(f)(x, x)) == float(((x * 2 + x) / 3).sum(dtype=np.float32))


def test_constant_operands_are_computed_at_run_time_as_eager_computes_them() -> None:
    """Eager hands every operand, Python numbers included, to its executable at run time.
    So the initializer's bounds, erf(-2 / sqrt 2) and erf(2 / sqrt 2), are computed on the
    device. If the engine let XLA fold them on the host at compile time, a device whose erf
    differs from the host's in the last bit would draw other kernels: on an H200 every
    answer moved, and the worker refused to start."""
    drawn = CompiledInit(3, 4)
    assert str(drawn._init.as_text()).count(" erf(") == 2


def _scalar_reduce_dimensions(hlo: str) -> list[str]:
    return re.findall(r"f32\[\] reduce\(.*?dimensions=\{([\d,]*)\}", hlo)


@pytest.mark.parametrize("output_shape", [(7,), (4, 64)])
def test_each_request_sum_is_the_reduce_eager_runs(output_shape: tuple[int, ...]) -> None:
    """A batch's sums are reduced one request at a time, each over its own output as eager
    reduces it. A row sliced out of the batch and reduced in place is a reduce over one more
    dimension, which a GPU runs in another order (an H200 gave other bits for 7 features)."""
    eager = jax.jit(jnp.sum).lower(jax.ShapeDtypeStruct(output_shape, jnp.float32))
    [wanted] = _scalar_reduce_dimensions(str(eager.compile().as_text()))
    batch = jax.ShapeDtypeStruct((2, *output_shape), jnp.float32)
    row = jax.ShapeDtypeStruct(output_shape, jnp.float32)
    reductions = jax.jit(functools.partial(orig_reductions, batch_size=2))
    lowered = reductions.lower(batch, batch, (row, row))
    assert _scalar_reduce_dimensions(str(lowered.compile().as_text())) == [wanted, wanted]


@pytest.mark.parametrize(("shape", "features"), [((128, 4), 512), ((64, 1024), 1024)])
def test_a_batch_of_large_outputs_sums_each_as_eager_does(
    shape: tuple[int, ...], features: int
) -> None:
    """Each request's sum reduces a buffer of its own, as eager's does. Reduced as a row
    copied out of the batch inside the reductions executable, outputs of 65,536 elements
    and more summed in another order on XLA's CPU kernels (seen on an AVX2 machine: both
    requests of a batch of two off in the last bits, alone they were exact)."""
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    engine = Engine(max_compiled=8, max_batch_size=2, max_param_cache_bytes=0)
    batched = engine.run([RoundTripInput(seed, x, features) for seed in (0, 1)])
    for seed, got in zip((0, 1), batched, strict=True):
        assert np.array_equal(answer(got), reference_with_outputs(seed, x, features)[0])


def test_batch_padding_never_changes_an_answer() -> None:
    engine = Engine(max_compiled=8, max_batch_size=8)
    rng = np.random.default_rng(0)
    items = [RoundTripInput(i, rng.standard_normal(5).astype(np.float32), 3) for i in range(5)]
    padded = engine.run(items)  # 5 requests run in the bucket of 8
    assert engine.bucket_for(5) == 8
    for item, got in zip(items, padded, strict=True):
        assert np.array_equal(answer(got), reference_with_outputs(item.seed, item.x, 3)[0])


def test_buckets_are_powers_of_two_up_to_the_maximum() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)


def test_compiled_cache_is_bounded_and_evicts_least_recently_used() -> None:
    engine = Engine(max_compiled=2)
    signatures = [ShapeSignature((w,), "float32", 2) for w in (1, 2, 3)]
    engine.executable(signatures[0], 1)
    engine.executable(signatures[1], 1)
    engine.executable(signatures[0], 1)  # touch: 1 becomes least recently used
    engine.executable(signatures[2], 1)
    assert engine.cached == 2
    assert engine.stats.evictions == 1
    assert engine.stats.compilations == 3
    engine.executable(signatures[0], 1)
    assert engine.stats.compilations == 3  # still cached


def test_float64_x_is_canonicalised_like_jnp_asarray() -> None:
    item = RoundTripInput(1, np.array([0.1, 0.2], np.float64), 2)
    assert item.signature.x_dtype == "float32"


def test_a_batch_must_hold_one_signature() -> None:
    engine = Engine(max_compiled=2, max_batch_size=2)
    with pytest.raises(ValueError, match="one shape signature"):
        engine.run(
            [
                RoundTripInput(0, np.ones(2, np.float32), 2),
                RoundTripInput(0, np.ones(3, np.float32), 2),
            ]
        )


def test_merged_sums_run_only_when_merged_bits_differ() -> None:
    orig = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    same = orig.copy()
    other = orig + np.float32(0.5)
    reductions = jax.jit(functools.partial(orig_reductions, batch_size=2))
    rows = (orig[0], orig[1])
    sums, abs_diff, same_bits = np.asarray(reductions(orig, same, rows))  # one array: one copy
    assert sums.tolist() == [3.0, 7.0]
    assert same_bits.tolist() == [1.0, 1.0]
    assert abs_diff.tolist() == [0.0, 0.0]
    _, abs_diff, same_bits = np.asarray(reductions(orig, other, rows))
    assert same_bits.tolist() == [0.0, 0.0]
    assert abs_diff.tolist() == [0.5, 0.5]
    merged = merged_sums(jax.numpy.asarray(other), 2, 2)
    assert merged.tolist() == [float(jax.numpy.sum(row)) for row in other]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_when_a_merged_output_differs_the_answer_says_so(batch_size: int) -> None:
    """The contract's failure case, forced: the merged output is the original plus 0.5.
    The answer carries the merged output's own sum and the difference, at batch sizes 1 and
    more (the reductions come back as one array, so their rows must not be mixed up)."""
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    compiled = Engine(max_compiled=4, max_batch_size=4).executable(
        RoundTripInput(7, x, 3).signature, batch_size
    )
    outputs = compiled._outputs

    def merged_off_by_half(*operands: object) -> tuple[object, ...]:
        orig_out, _, orig_rows, *drawn = outputs(*operands)
        return (orig_out, orig_out + np.float32(0.5), orig_rows, *drawn)

    # plain Python in the compiled program's place: called the same way, answering wrong
    compiled._outputs = merged_off_by_half  # type: ignore[assignment]
    items = [RoundTripInput(seed, x, 3) for seed in range(batch_size)]
    for item, got in zip(items, compiled(items), strict=True):
        expected, orig_out, _ = reference_with_outputs(item.seed, x, 3)
        assert got.orig_sum == expected[0]
        assert got.merged_sum == float(jax.numpy.sum(orig_out + np.float32(0.5)))
        assert got.merged_sum != got.orig_sum
        assert got.max_abs_diff == 0.5
