"""The JAX engine: the RoundTrip computation, compiled once per shape and batch size.

The contract (``SPEC.md``) is the eager reference: build ``nnx.Linear`` from
the seed, run it, ``nnx.split`` / ``nnx.merge`` it, run the merged model and
compare. The engine runs exactly those steps, but traced once into one jitted
pure function per :class:`ShapeSignature` and batch size (the seed is a traced
operand, the shapes are static), compiled ahead of time and kept in a bounded
LRU cache, so a warm request does no Python model building at all.

Three things keep it bit-identical to the eager reference:

* Eager JAX runs every primitive as its own XLA computation; a plain
  ``jax.jit`` of the same steps lets XLA's algebraic simplifier rewrite across
  them, and that changes last bits (seen on CPU at input width 1, where the
  initializer's ``sqrt(1 / fan_in) / 0.8796...`` gets folded into the
  multiply). :func:`isolate_primitives` replays the traced steps inside the
  jit with an optimization barrier on every floating-point intermediate, so
  no rewrite crosses a primitive boundary, and on every literal and constant
  of any dtype, so none is folded on the host at compile time (eager computes
  with them on the device: on an H200 the host's ``erf`` of the initializer's
  bounds moved every drawn kernel by an ulp).
* Reductions are where fusion changes answers: a sum fused into a bigger XLA
  kernel accumulates in another order than eager's standalone reduce (seen on
  CPU for a (3, 1) x, features 4: one ulp). So the first executable stops at
  steps 1-4 (both outputs), and a second one (:func:`orig_reductions`) runs steps
  5-6 on those materialized outputs, each sum a standalone reduce over its own
  request's output, of the shape eager's ``jnp.sum`` reduces (a row reduced in
  place in the batch is a reduce over one more dimension, which an H200 ran in
  another order).
* A batch runs as a ``lax.fori_loop`` over its requests inside one executable,
  the trip count an operand so padding rows cost nothing: each request is
  computed on its own, in the reference's order.
  ``jax.vmap`` would batch the matmuls and change the last bits.

Drawing the parameters is most of a request's work (at 64 x 64 as at
1024 x 1024), and it repeats whenever a seed does. So the engine keeps the
sets of seeds that repeat in a byte-bounded :class:`ParamCache` and runs steps
1-4 from them (:func:`round_trip_from_params`: the model is merged from those
arrays, then run, split, merged and run again). Sets of at least
:data:`PARAM_CACHE_MIN_ELEMENTS` stay on the device, drawn by an executable of
their own (:class:`CompiledInit`), and a seed's requests run together from its
one set; smaller sets (from :data:`ROW_CACHE_MIN_ELEMENTS`) come back as host
copies from the executable that drew them and are stacked per batch. The
arrays are the initializer's own bits, so every path gives the same answer.

The worker proves all of this at start (``warmup.self_check``) on the backend
it runs on, and the test suite checks it on hundreds of cases.

The engine is not thread-safe: one compute thread owns it (see ``batcher``).

>>> import numpy as np
>>> engine = Engine(max_compiled=8)
>>> [r] = engine.run([RoundTripInput(0, np.array([1.0, 2.0, 3.0], np.float32), 4)])
>>> r.orig_sum, r.merged_sum, r.max_abs_diff
(-4.221933364868164, -4.221933364868164, 0.0)
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from flax import nnx

from roundtrip.server import allocator
from roundtrip.server.param_cache import ParamCache

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ShapeSignature:
    """What a compiled executable is specialised on: everything but the seed and values."""

    x_shape: tuple[int, ...]
    x_dtype: str
    features: int
    with_outputs: bool = False

    def __str__(self) -> str:
        dims = "x".join(str(d) for d in self.x_shape)
        outputs = ",outputs" if self.with_outputs else ""
        return f"{self.x_dtype}[{dims}]->{self.features}{outputs}"


@dataclass(frozen=True, slots=True)
class RoundTripInput:
    """One validated request: an int64 seed, x as numpy, the output width."""

    seed: int
    x: npt.NDArray[Any]
    features: int
    with_outputs: bool = False
    #: Worked out once: the batcher queues by it and the engine checks it, per request.
    signature: ShapeSignature = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        signature = ShapeSignature(
            tuple(self.x.shape),
            canonical_name(self.x.dtype),
            self.features,
            self.with_outputs,
        )
        object.__setattr__(self, "signature", signature)  # frozen: set once, here


@dataclass(frozen=True, slots=True)
class RoundTripAnswer:
    """One request's answer as the engine computes it: the contract's three numbers (float32
    values, held as Python floats) and, when asked for, both outputs. The service encodes it
    for the wire; the engine itself knows nothing of gRPC or protobuf.
    """

    orig_sum: float
    merged_sum: float
    max_abs_diff: float
    orig_out: npt.NDArray[Any] | None = None
    merged_out: npt.NDArray[Any] | None = None

    def as_list(self) -> list[float]:
        """``[orig_sum, merged_sum, max_abs_diff]``, the contract's result array."""
        return [self.orig_sum, self.merged_sum, self.max_abs_diff]


@dataclass(slots=True)
class EngineStats:
    """Counters the metrics layer reads; only the compute thread writes them."""

    compilations: int = 0
    compile_seconds: float = 0.0
    cache_hits: int = 0
    evictions: int = 0
    batches: int = 0
    requests: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)

    @classmethod
    def total(cls, stats: Iterable[EngineStats]) -> EngineStats:
        """Every lane's counters added up."""
        total = cls()
        for one in stats:
            total.compilations += one.compilations
            total.compile_seconds += one.compile_seconds
            total.cache_hits += one.cache_hits
            total.evictions += one.evictions
            total.batches += one.batches
            total.requests += one.requests
            total.batch_sizes.update(one.batch_sizes)
        return total


@functools.cache
def canonical_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype ``jnp.asarray`` gives an array of ``dtype`` (float64 -> float32 unless x64).

    Cached: it runs per request, and JAX's 64-bit mode is fixed when the worker starts.
    """
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


@functools.cache
def canonical_name(dtype: np.dtype[Any]) -> str:
    """:func:`canonical_dtype`'s name (``"float32"``), cached: numpy works a dtype's name
    out in Python on every read, and a signature needs it per request."""
    return canonical_dtype(dtype).name


def x64_enabled() -> bool:
    """Whether JAX's 64-bit mode is on (``JAX_ENABLE_X64``): int64 stays int64."""
    return bool(canonical_dtype(np.dtype(np.int64)) == np.int64)


def seed_operand(seed: int) -> np.integer[Any]:
    """The traced seed that makes ``jax.random.key`` build the reference's key.

    With 64-bit mode off ``jax.random.key(seed)`` keeps the low 32 bits of any
    Python int (``-1`` is ``0xFFFFFFFF``, ``2**32`` is ``0``); a uint32 of those
    bits gives the same key. With 64-bit mode on, all 64 bits count.
    """
    if x64_enabled():
        return np.int64(seed)
    return np.uint32(seed & 0xFFFFFFFF)


def _barrier(value: Any) -> Any:
    """Make ``value`` opaque to XLA's fusion and algebraic simplifier (floats only).

    Integer and boolean arithmetic is exact however it is fused, so only
    floating-point values need the fence.
    """
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        return jax.lax.optimization_barrier(value)
    return value


def _opaque_constant(value: Any, aval: Any) -> Any:
    """A literal or constant operand made opaque to XLA, whatever its dtype.

    Eager dispatch hands every operand to its executable at run time, so XLA
    never computes with one at compile time. Under ``jit`` a constant, even an
    integer one, is folded into what follows it, on the host: on a GPU the
    initializer's ``erf(-2 / sqrt(2))`` (from the integer bounds -2 and 2) came
    out of the host's erf one ulp away from the device's, and moved every
    drawn kernel. Key-typed values are left as they are (no arithmetic).
    """
    dtype = getattr(aval, "dtype", None)
    if dtype is None or jnp.issubdtype(dtype, jax.dtypes.extended):
        return value
    return jax.lax.optimization_barrier(jnp.asarray(value, dtype))


def _eval_isolated(jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` primitive by primitive, as eager dispatch would.

    Each primitive's floating-point inputs and outputs pass through a barrier,
    and so does every literal and constant, of any dtype (:func:`_opaque_constant`).
    A nested ``jit`` stays whole (eager runs it as one executable); a
    ``custom_jvp_call`` / ``custom_vjp_call`` is opened up (eager runs its body
    op by op).
    """
    env: dict[jex.Var, Any] = {}

    def read(atom: Any) -> Any:
        if isinstance(atom, jex.Literal):
            return _opaque_constant(atom.val, atom.aval)
        return env[atom]

    for var, const in zip(jaxpr.constvars, consts, strict=True):
        env[var] = _opaque_constant(const, var.aval)
    for var, arg in zip(jaxpr.invars, args, strict=True):
        env[var] = arg
    for eqn in jaxpr.eqns:
        invals = [read(atom) for atom in eqn.invars]
        if eqn.primitive.name in _OPENED_CALLS:
            inner = eqn.params["call_jaxpr"]
            outvals = _eval_isolated(inner.jaxpr, inner.consts, invals)
        else:
            result = eqn.primitive.bind(*invals, **eqn.params)
            outvals = list(result) if eqn.primitive.multiple_results else [result]
            outvals = [_barrier(value) for value in outvals]
        for var, value in zip(eqn.outvars, outvals, strict=True):
            if not isinstance(var, jex.DropVar):
                env[var] = value
    return [read(atom) for atom in jaxpr.outvars]


_OPENED_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call"})


def isolate_primitives(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every primitive fenced off from its neighbours, for use under ``jax.jit``.

    >>> f = isolate_primitives(lambda a: (a * 2.0 + 1.0).sum())
    >>> float(jax.jit(f)(jnp.ones(3)))
    9.0
    """

    def isolated(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval_isolated(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return isolated


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


def _rows(array: jax.Array, batch_size: int) -> list[jax.Array]:
    return [array] if batch_size == 1 else [array[row] for row in range(batch_size)]


def orig_reductions(orig_out: jax.Array, merged_out: jax.Array, *, batch_size: int) -> jax.Array:
    """Reference steps 5-6 for each request of a batch of materialized outputs, as one
    ``(3, batch_size)`` array of the outputs' dtype: the rows are each request's
    ``orig_sum``, ``max_abs_diff`` and whether its merged output has the original's bits
    (1 or 0).

    Compiled on its own, so each ``orig_sum`` is a standalone reduce over its
    own request's output, as eager's ``jnp.sum`` is, never fused with the code
    that produced the values (a batched reduce over the rows accumulates in
    another order: 951 of 2,725 probes differed). Returns ``batch_size``
    separate sums, fenced off before they are gathered into one array so no
    concatenation fuses into them, then per request
    ``max(abs(orig - merged))`` (exact in any order, so batched) and whether
    ``merged_out`` has exactly ``orig_out``'s bits: a reduce is a deterministic
    function of its input bits, so then ``merged_sum == orig_sum`` exactly and
    its reduce need not run.

    One array, because the lane's thread waits once per array it copies to the host, and
    each wait gives the GIL to the event loop and must win it back: under load that cost
    more than the reductions (a batch of 16: 1.49 -> 1.12 ms beside a busy thread).
    Max, 0 and 1 are exact in any float dtype, and the sums are fenced off before stacking.
    """
    axes = tuple(range(1, orig_out.ndim)) if batch_size > 1 else None
    abs_diff = jnp.max(jnp.abs(orig_out - merged_out), axis=axes).reshape(-1)
    same_bits = jnp.all(_bits(orig_out) == _bits(merged_out), axis=axes).reshape(-1)
    sums = _stacked_sums(orig_out, batch_size)
    return jnp.stack([sums, abs_diff, same_bits.astype(sums.dtype)])


def merged_sums(merged_out: jax.Array, *, batch_size: int) -> jax.Array:
    """Each request's ``merged_sum`` as a standalone reduce; needed only when bits differ."""
    return _stacked_sums(merged_out, batch_size)


def _stacked_sums(outputs: jax.Array, batch_size: int) -> jax.Array:
    """One standalone reduce per request, fenced off, then gathered into one array: a
    single transfer to the host instead of one per request, and no fusion into the sums.
    Each row is fenced before its sum, so the reduce runs over that request's output in
    eager's shape rather than over a slice of the batch with one more dimension."""
    rows = jax.lax.optimization_barrier(tuple(_rows(outputs, batch_size)))
    sums = jax.lax.optimization_barrier(tuple(jnp.sum(row) for row in rows))
    return jnp.stack(sums)


def _bits(array: jax.Array) -> jax.Array:
    unsigned = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[array.dtype.itemsize]
    return jax.lax.bitcast_convert_type(array, unsigned)


def _single(seed: jax.Array, x: jax.Array, *, features: int, emit_params: bool = False) -> Any:
    body = functools.partial(round_trip, features=features, emit_params=emit_params)
    return isolate_primitives(body)(seed, x)


def _batched(
    seeds: jax.Array, xs: jax.Array, count: jax.Array, *, features: int, emit_params: bool = False
) -> Any:
    """The first ``count`` rows, one after the other; padding rows are never computed.

    Each request's body runs on its own in a ``lax.fori_loop`` whose trip count
    is an operand, so a batch of 18 in the bucket of 32 costs 18.
    """
    return _loop(
        lambda row: _single(seeds[row], xs[row], features=features, emit_params=emit_params),
        xs,
        count,
    )


def _batched_row_params(
    params: tuple[jax.Array, ...], xs: jax.Array, count: jax.Array, *, features: int
) -> Any:
    """:func:`_batched` for requests that each bring their own parameters (stacked)."""
    return _loop(
        lambda row: _single_from_params(
            tuple(leaf[row] for leaf in params), xs[row], features=features
        ),
        xs,
        count,
    )


def _single_from_params(params: tuple[jax.Array, ...], x: jax.Array, *, features: int) -> Any:
    return isolate_primitives(functools.partial(round_trip_from_params, features=features))(
        params, x
    )


def _batched_from_params(
    params: tuple[jax.Array, ...], xs: jax.Array, count: jax.Array, *, features: int
) -> Any:
    """:func:`_batched` for requests that share one seed's parameters (given)."""
    return _loop(lambda row: _single_from_params(params, xs[row], features=features), xs, count)


def _loop(single: Callable[[jax.Array], Any], xs: jax.Array, count: jax.Array) -> Any:
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


class CompiledInit:
    """Reference step 1 for one (width, features), compiled: seed -> parameters."""

    def __init__(self, width: int, features: int, device: jax.Device | None = None) -> None:
        self._init = (
            jax.jit(
                isolate_primitives(functools.partial(init_params, width=width, features=features))
            )
            .lower(placed(jax.ShapeDtypeStruct((), seed_operand(0).dtype), device))
            .compile()
        )

    def __call__(self, seed: int) -> tuple[jax.Array, ...]:
        return tuple(self._init(seed_operand(seed)))


ParamSource = Literal["seed", "shared", "rows"]
"""Where an executable's parameters come from: drawn from each request's seed; given once
for all its requests (a shared seed's cached set); given per request (stacked sets)."""


class CompiledRoundTrip:
    """The two executables for ``batch_size`` requests of one :class:`ShapeSignature`.

    ``outputs`` runs steps 1-4 (both outputs; with ``emit_params`` also the parameters it
    drew, per request); ``orig_reductions`` runs steps 5-6 on them without a round trip
    through the host (``merged_sums`` is compiled only if a merged output ever differs).
    """

    def __init__(
        self,
        signature: ShapeSignature,
        batch_size: int,
        *,
        source: ParamSource = "seed",
        emit_params: bool = False,
        device: jax.Device | None = None,
    ) -> None:
        self.signature = signature
        self.batch_size = batch_size
        self.source = source
        self._seed_dtype = seed_operand(0).dtype
        self._x_dtype = np.dtype(signature.x_dtype)
        batch_dims: tuple[int, ...] = () if batch_size == 1 else (batch_size,)
        width, features = signature.x_shape[-1], signature.features
        body: Callable[..., Any]
        first: Any
        if source == "seed":
            body = functools.partial(
                _single if batch_size == 1 else _batched, emit_params=emit_params
            )
            first = jax.ShapeDtypeStruct(batch_dims, self._seed_dtype)
        elif source == "shared" or batch_size == 1:
            body = _single_from_params if batch_size == 1 else _batched_from_params
            first = param_specs(width, features)
        else:
            body = _batched_row_params
            first = tuple(
                jax.ShapeDtypeStruct((batch_size, *spec.shape), spec.dtype)
                for spec in param_specs(width, features)
            )
        self._param_shapes = [spec.shape for spec in param_specs(width, features)]
        specs = [first, jax.ShapeDtypeStruct(batch_dims + signature.x_shape, self._x_dtype)]
        if batch_size > 1:
            specs.append(jax.ShapeDtypeStruct((), np.int32))
        specs = placed(specs, device)
        outputs_fn = functools.partial(body, features=features)
        self._outputs = jax.jit(outputs_fn).lower(*specs).compile()
        orig_spec, merged_spec, *_ = jax.eval_shape(outputs_fn, *specs)
        orig_spec, merged_spec = placed((orig_spec, merged_spec), device)
        self._orig_reductions = (
            jax.jit(functools.partial(orig_reductions, batch_size=batch_size))
            .lower(orig_spec, merged_spec)
            .compile()
        )
        self._merged_spec = merged_spec
        self._merged_sums: Any = None  # compiled on first need: merged bits never differ

    def _stacked(self, shape: tuple[int, ...], leaves: Sequence[Any]) -> npt.NDArray[Any]:
        """One parameter leaf of every request, stacked into the batch's operand in one copy;
        padding rows are zeros (the executable never reads them)."""
        stacked = np.empty((self.batch_size, *shape), np.float32)
        np.stack(leaves, out=stacked[: len(leaves)])
        stacked[len(leaves) :] = 0
        return stacked

    def __call__(
        self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None = None
    ) -> list[RoundTripAnswer]:
        """Run ``inputs`` (at most ``batch_size``; the rest is padding) and split the answers.

        ``params``: for ``shared``, the one parameter set all of ``inputs`` use; for
        ``rows``, each request's set, in order.
        """
        return self.run(inputs, params)[0]

    def run(
        self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None = None
    ) -> tuple[list[RoundTripAnswer], list[tuple[npt.NDArray[Any], ...]]]:
        """:meth:`__call__`, and the parameters each request's seed drew (host copies) when
        compiled with ``emit_params`` (else no sets)."""
        operands: list[Any]
        if self.batch_size == 1:
            if self.source == "seed":
                first: Any = seed_operand(inputs[0].seed)
            else:
                first = params if self.source == "shared" else params[0]  # type: ignore[index]
            operands = [first, np.asarray(inputs[0].x, self._x_dtype)]
        else:
            xs = np.zeros((self.batch_size, *self.signature.x_shape), dtype=self._x_dtype)
            for row, item in enumerate(inputs):
                xs[row] = item.x
            if self.source == "shared":
                first = params
            elif self.source == "rows":
                assert params is not None
                first = tuple(
                    self._stacked(shape, [row_params[leaf] for row_params in params])
                    for leaf, shape in enumerate(self._param_shapes)
                )
            else:
                first = np.zeros(self.batch_size, dtype=self._seed_dtype)
                for row, item in enumerate(inputs):
                    first[row] = seed_operand(item.seed)
            operands = [first, xs, np.int32(len(inputs))]
        orig_outs, merged_outs, *drawn = self._outputs(*operands)
        orig_sums, abs_diffs, same_bits = np.asarray(self._orig_reductions(orig_outs, merged_outs))
        merged = orig_sums
        if not same_bits[: len(inputs)].all():  # the contract's failure case: sum them too
            if self._merged_sums is None:
                self._merged_sums = (
                    jax.jit(functools.partial(merged_sums, batch_size=self.batch_size))
                    .lower(self._merged_spec)
                    .compile()
                )
            merged = np.asarray(self._merged_sums(merged_outs))
        if self.signature.with_outputs:
            orig_host, merged_host = np.asarray(orig_outs), np.asarray(merged_outs)
            if self.batch_size == 1:
                orig_host, merged_host = orig_host[None], merged_host[None]
        count = len(inputs)  # tolist(): exact Python floats, one call per array, not per row
        sums = zip(
            orig_sums[:count].tolist(),
            merged[:count].tolist(),
            abs_diffs[:count].tolist(),
            strict=True,
        )
        answers = [
            RoundTripAnswer(
                orig_sum=orig_sum,
                merged_sum=merged_sum,
                max_abs_diff=max_abs_diff,
                orig_out=orig_host[row] if self.signature.with_outputs else None,
                merged_out=merged_host[row] if self.signature.with_outputs else None,
            )
            for row, (orig_sum, merged_sum, max_abs_diff) in enumerate(sums)
        ]
        drawn_host = [np.asarray(leaf) for leaf in drawn]
        if self.batch_size == 1:
            drawn_host = [leaf[None] for leaf in drawn_host]
        sets = (
            [tuple(np.array(leaf[row]) for leaf in drawn_host) for row in range(len(inputs))]
            if drawn_host
            else []
        )
        return answers, sets


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes that get an executable: powers of two up to ``max_batch_size``, and it.

    Padding a batch up to the next bucket bounds the number of compilations per
    signature to about log2(max_batch_size).
    """
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


#: Parameter sets of at least this many elements are cached (when the cache is on)...
ROW_CACHE_MIN_ELEMENTS = 1024
#: ...and from this size on they stay on the device and a seed's requests run together
#: from its one set; below it, sets are kept as host copies and stacked per batch.
PARAM_CACHE_MIN_ELEMENTS = 65536

ParamKey = tuple[int, int, int, str]
"""What determines a parameter set: the seed's effective bits, width, features, dtype."""


def param_key(seed: int, width: int, features: int) -> ParamKey:
    """Seeds that build the same key share parameters (``0`` and ``2**32`` without x64).

    >>> param_key(2**32 + 5, 1024, 8) == param_key(5, 1024, 8)
    True
    """
    return (int(seed_operand(seed)), width, features, "float32")


class Engine:
    """Runs batches of same-signature requests through cached executables.

    ``device`` is where its executables run (one engine per device: a compute lane);
    ``max_compiled`` bounds the executables kept (least recently used is evicted first);
    ``max_batch_size`` sets the largest batch and its buckets. ``max_param_cache_bytes``
    bounds the parameter sets kept (:class:`~roundtrip.server.param_cache.ParamCache`)
    for signatures of at least :data:`PARAM_CACHE_MIN_ELEMENTS` parameters: their requests
    are grouped by seed, a seed that repeats runs from its parameters (drawn once, then
    reused), a seed seen for the first time runs as it always did, and the answers have
    the same bits either way.
    """

    def __init__(
        self,
        *,
        max_compiled: int,
        max_batch_size: int = 1,
        max_param_cache_bytes: int = 0,
        device: jax.Device | None = None,
    ) -> None:
        if max_compiled < 1 or max_batch_size < 1:
            raise ValueError("max_compiled and max_batch_size must be >= 1")
        self.device = device
        self.max_compiled = max_compiled
        self.buckets = batch_buckets(max_batch_size)
        self.stats = EngineStats()
        # device arrays (shared tier) or host copies (rows tier): both are read as arrays
        self.params: ParamCache[tuple[Any, ...]] = ParamCache(
            max_param_cache_bytes, on_evict=allocator.release_freed
        )
        self._cache: collections.OrderedDict[
            tuple[ShapeSignature, int, ParamSource, bool], CompiledRoundTrip
        ] = collections.OrderedDict()
        self._inits: collections.OrderedDict[tuple[int, int], CompiledInit] = (
            collections.OrderedDict()
        )

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    @property
    def cached(self) -> int:
        return len(self._cache) + len(self._inits)

    def bucket_for(self, count: int) -> int:
        """The smallest bucket that holds ``count`` requests."""
        for size in self.buckets:
            if size >= count:
                return size
        raise ValueError(f"batch of {count} exceeds max_batch_size {self.max_batch_size}")

    def param_tier(self, signature: ShapeSignature) -> ParamSource | None:
        """How requests of ``signature`` use the parameter cache: ``shared`` (large sets, on
        the device, one per seed group), ``rows`` (small sets, host copies stacked per
        batch), or ``None`` (tiny sets, or the cache is off: drawn per request)."""
        elements = (signature.x_shape[-1] + 1) * signature.features
        if elements < ROW_CACHE_MIN_ELEMENTS or not self.params.fits(elements * 4):
            return None
        return "shared" if elements >= PARAM_CACHE_MIN_ELEMENTS else "rows"

    def caches_params(self, signature: ShapeSignature) -> bool:
        """Whether requests of ``signature`` may run from cached parameters."""
        return self.param_tier(signature) is not None

    def prepare(self, signature: ShapeSignature, batch_size: int) -> None:
        """Compile what a batch of ``signature`` at ``batch_size`` may run (warm-up)."""
        tier = self.param_tier(signature)
        if tier == "shared":
            self.initializer(signature.x_shape[-1], signature.features)
        if tier is not None:
            self.executable(signature, batch_size, source=tier)
        self.executable(signature, batch_size, emit_params=tier == "rows")

    def executable(
        self,
        signature: ShapeSignature,
        batch_size: int,
        *,
        source: ParamSource = "seed",
        emit_params: bool = False,
    ) -> CompiledRoundTrip:
        """The cached executable for ``signature`` at ``batch_size``, compiling it if needed."""
        key = (signature, batch_size, source, emit_params)
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            self.stats.cache_hits += 1
            return compiled
        compiled = self._compile(
            lambda: CompiledRoundTrip(
                signature, batch_size, source=source, emit_params=emit_params, device=self.device
            )
        )
        self._cache[key] = compiled
        self._evict()
        return compiled

    def initializer(self, width: int, features: int) -> CompiledInit:
        """The compiled parameter initializer for (width, features)."""
        key = (width, features)
        compiled = self._inits.get(key)
        if compiled is not None:
            self._inits.move_to_end(key)
            return compiled
        compiled = self._compile(lambda: CompiledInit(width, features, self.device))
        self._inits[key] = compiled
        self._evict()
        return compiled

    def _compile(self, build: Callable[[], T]) -> T:
        started = time.perf_counter()
        compiled = build()
        self.stats.compile_seconds += time.perf_counter() - started
        self.stats.compilations += 1
        return compiled

    def _evict(self) -> None:
        while self.cached > self.max_compiled:
            if self._inits and (not self._cache or len(self._inits) > len(self._cache)):
                self._inits.popitem(last=False)
            else:
                self._cache.popitem(last=False)
            self.stats.evictions += 1

    def run(self, inputs: Sequence[RoundTripInput]) -> list[RoundTripAnswer]:
        """Answer ``inputs`` (one signature, at most ``max_batch_size``) in order."""
        if not inputs:
            return []
        signature = inputs[0].signature
        if any(item.signature != signature for item in inputs):
            raise ValueError("a batch must hold one shape signature")
        tier = self.param_tier(signature)
        if tier == "shared":
            results = self._run_shared(signature, inputs)
        elif tier == "rows":
            results = self._run_rows(signature, inputs)
        else:
            results = self.executable(signature, self.bucket_for(len(inputs)))(inputs)
        self.stats.batches += 1
        self.stats.requests += len(inputs)
        self.stats.batch_sizes[len(inputs)] += 1
        return results

    def _run_shared(
        self, signature: ShapeSignature, inputs: Sequence[RoundTripInput]
    ) -> list[RoundTripAnswer]:
        """Group ``inputs`` by parameter set and run each group from its parameters: cached
        ones, or drawn now and cached when the set repeats (seen before, or more than once in
        this batch). Sets seen for the first time run together as before, from their seeds.
        """
        width, features = signature.x_shape[-1], signature.features
        groups: dict[ParamKey, list[int]] = {}
        for row, item in enumerate(inputs):
            groups.setdefault(param_key(item.seed, width, features), []).append(row)
        answers: list[RoundTripAnswer | None] = [None] * len(inputs)
        first_seen: list[int] = []
        for key, rows in groups.items():
            params = self.params.get(key)
            if params is None:
                if not self.params.seen_before(key) and len(rows) == 1:
                    first_seen += rows
                    continue
                params = self.initializer(width, features)(inputs[rows[0]].seed)
                self.params.put(key, params, nbytes=sum(p.nbytes for p in params))
            group = [inputs[row] for row in rows]
            compiled = self.executable(signature, self.bucket_for(len(group)), source="shared")
            for row, answer in zip(rows, compiled(group, params), strict=True):
                answers[row] = answer
        if first_seen:
            group = [inputs[row] for row in first_seen]
            compiled = self.executable(signature, self.bucket_for(len(group)))
            for row, answer in zip(first_seen, compiled(group), strict=True):
                answers[row] = answer
        return [answer for answer in answers if answer is not None]

    def _run_rows(
        self, signature: ShapeSignature, inputs: Sequence[RoundTripInput]
    ) -> list[RoundTripAnswer]:
        """Requests whose sets are cached run together from them (stacked); the others run
        from their seeds in one executable that also hands back the sets it drew, and a set
        is kept when its seed repeats."""
        width, features = signature.x_shape[-1], signature.features
        keys = [param_key(item.seed, width, features) for item in inputs]
        found = [self.params.get(key) for key in keys]
        answers: list[RoundTripAnswer | None] = [None] * len(inputs)
        hits = [row for row, params in enumerate(found) if params is not None]
        if hits:
            compiled = self.executable(signature, self.bucket_for(len(hits)), source="rows")
            group = [inputs[row] for row in hits]
            for row, answer in zip(
                hits, compiled(group, [found[row] for row in hits]), strict=True
            ):
                answers[row] = answer
        drawn = [row for row, params in enumerate(found) if params is None]
        if drawn:
            compiled = self.executable(signature, self.bucket_for(len(drawn)), emit_params=True)
            group_answers, sets = compiled.run([inputs[row] for row in drawn])
            repeated = {key for key in (keys[row] for row in drawn) if self.params.seen_before(key)}
            for row, answer, params in zip(drawn, group_answers, sets, strict=True):
                answers[row] = answer
                if keys[row] in repeated:
                    self.params.put(keys[row], params, nbytes=sum(p.nbytes for p in params))
        return [answer for answer in answers if answer is not None]
