"""The RoundTrip computation as pure JAX programs: the reference steps written once, traced
with the seed as an operand and the shapes static, batched by a loop over the requests.

Nothing here compiles or holds state: :mod:`~roundtrip.server.numerics.executables` lowers these
programs (fenced by :mod:`~roundtrip.server.numerics.fencing`) into executables per shape and batch
size, and the engine picks which to run.

* Steps 1-4 (build, run, split, merge, run): :func:`round_trip` from a seed, and
  :func:`round_trip_from_params` from parameters :func:`init_params` drew earlier (the
  parameter cache's path: the same arrays, so the same bits).
* Steps 5-6 (the sums and the largest difference): :func:`orig_reductions` on outputs
  already materialized, each request's sum a standalone reduce in eager's shape (a sum
  fused into a bigger kernel, or a row reduced in place in the batch, accumulates in
  another order), and :func:`merged_sums` only when a merged output's bits differ.
* Batches, two ways. Looped (:func:`loop_over_rows`): a ``lax.fori_loop`` whose trip
  count is an operand, so each request is computed on its own, as eager computes it, and
  padding rows never are. Batched (``batched=True``): ``jax.vmap`` of the same fenced
  steps, so the draws and the matmuls run as one batched operation each. A batched
  matmul may accumulate in another order than eager's, so a batched program serves only
  once :mod:`~roundtrip.server.engine.proof` has shown it gives eager's bits on this
  device (docs/adr/0011); the reductions stay each request's own either way.

>>> import numpy as np
>>> seed_operand(-1), seed_operand(2**32 + 5)  # the low 32 bits, as jax.random.key keeps
(np.uint32(4294967295), np.uint32(5))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from flax import nnx

from roundtrip.server.numerics.fencing import isolate_primitives
from roundtrip.server.values import x64_enabled


def seed_operand(seed: int) -> np.integer[Any]:
    """The traced seed that makes ``jax.random.key`` build the reference's key.

    With 64-bit mode off ``jax.random.key(seed)`` keeps the low 32 bits of any
    Python int (``-1`` is ``0xFFFFFFFF``, ``2**32`` is ``0``); a uint32 of those
    bits gives the same key. With 64-bit mode on, all 64 bits count.
    """
    if x64_enabled():
        return np.int64(seed)
    return np.uint32(seed & 0xFFFFFFFF)


def seed_operands(seeds: Sequence[int], size: int) -> npt.NDArray[Any]:
    """:func:`seed_operand` of each of ``seeds``, as one array of ``size`` (zeros past
    them: a batch's padding), converted in one step rather than one scalar each.

    >>> seed_operands([-1, 2**32 + 5], 3).tolist()
    [4294967295, 5, 0]
    """
    operands = np.zeros(size, dtype=seed_operand(0).dtype)
    if x64_enabled():
        operands[: len(seeds)] = seeds
    else:
        operands[: len(seeds)] = [seed & 0xFFFFFFFF for seed in seeds]
    return operands


def round_trip(
    seed: jax.Array, x: jax.Array, features: int, *, emit_params: bool = False
) -> tuple[jax.Array, ...]:
    """Reference steps 1-4 as a pure function of a traced seed and x: both outputs, and
    with ``emit_params`` the parameters step 1 drew (the state's leaves: bias, kernel)."""
    model = nnx.Linear(
        in_features=x.shape[-1],
        out_features=features,
        rngs=nnx.Rngs(jax.random.key(seed)),
    )
    orig_out = model(x)
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    merged_out = merged(x)
    if emit_params:
        return (orig_out, merged_out, *jax.tree.leaves(state))
    return orig_out, merged_out


def init_params(seed: jax.Array, *, width: int, features: int) -> tuple[jax.Array, ...]:
    """Reference step 1 alone: the parameters ``nnx.Linear`` draws from the seed, as the
    leaves of its state (bias, kernel)."""
    model = nnx.Linear(
        in_features=width, out_features=features, rngs=nnx.Rngs(jax.random.key(seed))
    )
    _, state = nnx.split(model)
    return tuple(jax.tree.leaves(state))


def round_trip_from_params(
    params: tuple[jax.Array, ...], x: jax.Array, features: int
) -> tuple[jax.Array, jax.Array]:
    """Reference steps 1-4 with step 1's parameters given (:func:`init_params`' bits): the
    model is merged from them, then run, split, merged and run again, as the reference's."""
    abstract = nnx.eval_shape(
        lambda: nnx.Linear(in_features=x.shape[-1], out_features=features, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    model = nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), params))
    orig_out = model(x)
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    merged_out = merged(x)
    return orig_out, merged_out


Reductions = Literal["buffers", "sliced", "rowwise"]
"""How a batch's ``orig_sum`` reductions run (:func:`orig_reductions`): over each request's
output handed over as a buffer of its own (eager's exact shape and placement), over each
request's row sliced out inside the reductions' executable, or as one row-wise reduce."""


def rows_of(outputs: jax.Array, batch_size: int) -> tuple[jax.Array, ...]:
    """Each request's output of a batch, as an output of its own: the executable that
    computes the batch hands them back as separate buffers, each of the request's own shape,
    which is what eager's ``jnp.sum`` reduces (a parameter of that shape)."""
    return (outputs,) if batch_size == 1 else tuple(outputs[row] for row in range(batch_size))


def orig_reductions(
    orig_out: jax.Array,
    merged_out: jax.Array,
    orig_rows: tuple[jax.Array, ...],
    *,
    batch_size: int,
    how: Reductions = "buffers",
) -> jax.Array:
    """Reference steps 5-6 for each request of a batch of materialized outputs, as one
    ``(3, batch_size)`` array of the outputs' dtype: the rows are each request's
    ``orig_sum``, ``max_abs_diff`` and whether its merged output has the original's bits
    (1 or 0).

    Compiled on its own, and each ``orig_sum`` reduces a parameter of its own: the
    request's output, handed over as a separate buffer (:func:`rows_of`), exactly what
    eager's ``jnp.sum`` reduces. A reduce fused with the code that produced the values
    accumulates in another order (951 of 2,725 probes differed); so does one over a row
    sliced out of the batch inside this executable, whether in place (a GPU reduced
    ``f32[1,7]`` over two dimensions where eager reduces ``f32[7]``) or copied to a
    temporary buffer first (XLA's CPU reduce kernels gave other bits for 65,536 elements
    and up). The sums are fenced off before they are gathered into one array so no
    concatenation fuses into them. Then per request ``max(abs(orig - merged))`` (exact in
    any order, so batched) and whether ``merged_out`` has exactly ``orig_out``'s bits: a
    reduce is a deterministic function of its input bits, so then ``merged_sum ==
    orig_sum`` exactly and its reduce need not run.

    One array, because the lane's thread waits once per array it copies to the host, and
    each wait gives the GIL to the event loop and must win it back: under load that cost
    more than the reductions (a batch of 16: 1.49 -> 1.12 ms beside a busy thread).
    Max, 0 and 1 are exact in any float dtype.

    ``how`` "sliced" and "rowwise" need no buffer per request (``orig_rows`` is empty):
    each request's row sliced out and reduced on its own inside this executable, or all
    rows in one row-wise reduce. Cheaper, and eager's order only where a proof on the
    device shows it (:mod:`~roundtrip.server.engine.proof`; on this CPU "sliced" held
    below 65,536 output elements, and at 65,536 in a batch of 2 but not of 64; "rowwise"
    for the narrowest outputs only).
    """
    axes = tuple(range(1, orig_out.ndim)) if batch_size > 1 else None
    abs_diff = jnp.max(jnp.abs(orig_out - merged_out), axis=axes).reshape(-1)
    same_bits = jnp.all(_bits(orig_out) == _bits(merged_out), axis=axes).reshape(-1)
    if how == "rowwise":
        sums = jnp.sum(jax.lax.optimization_barrier(orig_out), axis=axes).reshape(-1)
    else:
        if how == "sliced":
            orig_rows = jax.lax.optimization_barrier(rows_of(orig_out, batch_size))
        sums = jnp.stack(jax.lax.optimization_barrier(tuple(jnp.sum(row) for row in orig_rows)))
    return jnp.stack([sums, abs_diff, same_bits.astype(sums.dtype)])


def _bits(array: jax.Array) -> jax.Array:
    unsigned = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[array.dtype.itemsize]
    return jax.lax.bitcast_convert_type(array, unsigned)


def one_request(seed: jax.Array, x: jax.Array, *, features: int, emit_params: bool = False) -> Any:
    body = functools.partial(round_trip, features=features, emit_params=emit_params)
    return isolate_primitives(body)(seed, x)


def batch_from_seeds(
    seeds: jax.Array,
    xs: jax.Array,
    count: jax.Array,
    *,
    features: int,
    emit_params: bool = False,
    batched: bool = False,
) -> Any:
    """The first ``count`` rows, one after the other; padding rows are never computed.

    Each request's body runs on its own in a ``lax.fori_loop`` whose trip count
    is an operand, so a batch of 18 in the bucket of 32 costs 18. ``batched``: every
    row at once (``jax.vmap``; padding rows too), for a program proven to keep the bits.
    """
    one = functools.partial(one_request, features=features, emit_params=emit_params)
    if batched:
        return jax.vmap(one)(seeds, xs)
    return loop_over_rows(lambda row: one(seeds[row], xs[row]), xs, count)


def batch_from_row_params(
    params: tuple[jax.Array, ...],
    xs: jax.Array,
    count: jax.Array,
    *,
    features: int,
    batched: bool = False,
) -> Any:
    """:func:`batch_from_seeds` for requests that each bring their own parameters (stacked)."""
    one = functools.partial(one_from_params, features=features)
    if batched:
        return jax.vmap(one)(params, xs)
    return loop_over_rows(lambda row: one(tuple(leaf[row] for leaf in params), xs[row]), xs, count)


def one_from_params(params: tuple[jax.Array, ...], x: jax.Array, *, features: int) -> Any:
    return isolate_primitives(functools.partial(round_trip_from_params, features=features))(
        params, x
    )


def batch_from_shared_params(
    params: tuple[jax.Array, ...],
    xs: jax.Array,
    count: jax.Array,
    *,
    features: int,
    batched: bool = False,
) -> Any:
    """:func:`batch_from_seeds` for requests that share one seed's parameters (given)."""
    one = functools.partial(one_from_params, params, features=features)
    if batched:
        return jax.vmap(one)(xs)
    return loop_over_rows(lambda row: one(xs[row]), xs, count)


def loop_over_rows(single: Callable[[jax.Array], Any], xs: jax.Array, count: jax.Array) -> Any:
    row_shape = jax.eval_shape(single, jnp.int32(0))
    empty = tuple(jnp.zeros((xs.shape[0], *spec.shape), spec.dtype) for spec in row_shape)

    def one(row: jax.Array, outs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return tuple(out.at[row].set(value) for out, value in zip(outs, single(row), strict=True))

    return jax.lax.fori_loop(0, count, one, empty)


def placed(specs: Any, device: jax.Device | None) -> Any:
    """``specs`` (a pytree of ShapeDtypeStructs) committed to ``device``, so an executable
    lowered from them runs there (``None``: JAX's default device)."""
    if device is None:
        return specs
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(
        lambda spec: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding), specs
    )


def param_specs(width: int, features: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The shapes and dtypes of :func:`init_params`' outputs."""
    specs: tuple[jax.ShapeDtypeStruct, ...] = jax.eval_shape(
        functools.partial(init_params, width=width, features=features),
        jax.ShapeDtypeStruct((), seed_operand(0).dtype),
    )
    return specs
