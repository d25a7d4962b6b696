"""The programs compiled: one small class per parameter source, sharing the reductions tail.

A :class:`CompiledRoundTrip` holds the two executables for ``batch_size`` requests of one
:class:`~roundtrip.server.values.ShapeSignature`: ``outputs`` runs steps 1-4 (both outputs,
and each request's original output again as a buffer of its own) and ``orig_reductions``
runs steps 5-6 on them without a round trip through the host. What differs between the
kinds is where step 1's parameters come from, which is the first operand:

* :class:`FromSeeds`: drawn from each request's seed inside the executable (with
  ``emit_params``, the executable also hands back the sets it drew, for the cache);
* :class:`FromSharedParams`: one cached set, on the device, for every request of the batch
  (a seed that repeats);
* :class:`FromRowParams`: one cached set per request, host copies stacked per batch.

:class:`CompiledInit` is step 1 alone, for the device-side cache.

Each kind compiles a batch of more than one request looped (each request computed on its
own, as eager computes it) or, with ``batched``, as one batched program: the engine asks
for a batched one only where :mod:`~roundtrip.server.engine.proof` has shown it keeps
eager's bits on this device.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from roundtrip.server.numerics import programs
from roundtrip.server.numerics.fencing import isolate_primitives
from roundtrip.server.numerics.programs import Reductions, param_specs, placed, seed_operand
from roundtrip.server.values import RoundTripAnswer, RoundTripInput, ShapeSignature

ParamSource = Literal["seed", "shared", "rows"]
"""Where an executable's parameters come from: drawn from each request's seed; given once
for all its requests (a shared seed's cached set); given per request (stacked sets)."""

DrawnSets = list[tuple[npt.NDArray[Any], ...]]


class ProgramKey(NamedTuple):
    """What determines an executable: the requests' signature, the batch size, where the
    parameters come from, and (from seeds) whether the drawn sets are handed back."""

    signature: ShapeSignature
    batch_size: int
    source: ParamSource = "seed"
    emit_params: bool = False


class CompiledInit:
    """Reference step 1 for one (width, features), compiled: seed -> parameters."""

    def __init__(self, width: int, features: int, device: jax.Device | None = None) -> None:
        init = functools.partial(programs.init_params, width=width, features=features)
        self._init = (
            jax.jit(isolate_primitives(init))
            .lower(placed(jax.ShapeDtypeStruct((), seed_operand(0).dtype), device))
            .compile()
        )

    def __call__(self, seed: int) -> tuple[jax.Array, ...]:
        return tuple(self._init(seed_operand(seed)))


class CompiledRoundTrip:
    """The executables for ``batch_size`` requests of ``signature``; a subclass says where
    the parameters come from (:meth:`_program`, :meth:`_parameters`). ``batched``: steps
    1-4 for every row at once (``jax.vmap``) instead of row after row, and the sums reduced
    as ``reductions`` says (:func:`~roundtrip.server.numerics.programs.orig_reductions`;
    a looped program hands each request's output over as a buffer of its own)."""

    def __init__(
        self,
        signature: ShapeSignature,
        batch_size: int,
        *,
        device: jax.Device | None = None,
        batched: bool = False,
        reductions: Reductions = "sliced",
    ) -> None:
        self.signature = signature
        self.batch_size = batch_size
        self.batched = batched and batch_size > 1
        self.reductions: Reductions = reductions if self.batched else "buffers"
        self._x_dtype = np.dtype(signature.x_dtype)
        width, features = signature.x_shape[-1], signature.features
        self._param_shapes = [spec.shape for spec in param_specs(width, features)]
        body, first = self._program()
        if self.batched:
            body = functools.partial(body, batched=True)
        batch_dims: tuple[int, ...] = () if batch_size == 1 else (batch_size,)
        specs = [first, jax.ShapeDtypeStruct(batch_dims + signature.x_shape, self._x_dtype)]
        if batch_size > 1:
            specs.append(jax.ShapeDtypeStruct((), np.int32))
        specs = placed(specs, device)
        rows = batch_size if self.reductions == "buffers" else 0
        outputs = functools.partial(_with_rows, body, features=features, rows=rows)
        self._outputs = jax.jit(outputs).lower(*specs).compile()
        orig_spec, merged_spec, rows_spec, *_ = jax.eval_shape(outputs, *specs)
        self._reduced = placed((orig_spec, merged_spec, rows_spec), device)
        self._orig_reductions = self._compile_reductions()

    def _compile_reductions(self) -> Any:
        reductions = functools.partial(
            programs.orig_reductions, batch_size=self.batch_size, how=self.reductions
        )
        return jax.jit(reductions).lower(*self._reduced).compile()

    def with_reductions(self, how: Reductions) -> CompiledRoundTrip:
        """This batched program with its sums reduced as ``how`` says (steps 1-4 shared,
        the reductions compiled anew)."""
        if not self.batched or "buffers" in (how, self.reductions):
            raise ValueError("only a batched program's sliced or rowwise sums are swapped")
        other = copy.copy(self)
        other.reductions = how
        other._orig_reductions = other._compile_reductions()
        return other

    def _program(self) -> tuple[Callable[..., Any], Any]:
        """The steps 1-4 program for this batch size, and its first operand's spec."""
        raise NotImplementedError

    def _parameters(self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None) -> Any:
        """The first operand for ``inputs``."""
        raise NotImplementedError

    def __call__(
        self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None = None
    ) -> list[RoundTripAnswer]:
        """Run ``inputs`` (at most ``batch_size``; the rest is padding) and split the answers.

        ``params``: for :class:`FromSharedParams`, the one parameter set all of ``inputs``
        use; for :class:`FromRowParams`, each request's set, in order.
        """
        return self.run(inputs, params)[0]

    def run(
        self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None = None
    ) -> tuple[list[RoundTripAnswer], DrawnSets]:
        """:meth:`__call__`, and the parameters each request's seed drew (host copies) when
        the executable hands them back (else no sets)."""
        orig_outs, merged_outs, orig_rows, *drawn = self.outputs(inputs, params)
        answers = self._answers(len(inputs), orig_outs, merged_outs, orig_rows)
        return answers, self._sets(drawn, len(inputs))

    def outputs(self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None) -> Any:
        """Steps 1-4 for ``inputs``: both outputs of the whole batch (a leading batch axis
        when ``batch_size`` > 1; rows past ``len(inputs)`` are padding), each request's
        original output on its own, and any parameter sets drawn."""
        operands = [self._parameters(inputs, params), self._xs(inputs)]
        if self.batch_size > 1:
            operands.append(np.int32(len(inputs)))
        return self._outputs(*operands)

    def _xs(self, inputs: Sequence[RoundTripInput]) -> npt.NDArray[Any]:
        if self.batch_size == 1:
            return np.asarray(inputs[0].x, self._x_dtype)
        xs = np.zeros((self.batch_size, *self.signature.x_shape), dtype=self._x_dtype)
        for row, item in enumerate(inputs):
            xs[row] = item.x
        return xs

    def _answers(
        self, count: int, orig_outs: Any, merged_outs: Any, orig_rows: Any
    ) -> list[RoundTripAnswer]:
        """Steps 5-6 on the batch's outputs, split into each request's answer."""
        reduced = self._orig_reductions(orig_outs, merged_outs, orig_rows)
        orig_sums, abs_diffs, same_bits = np.asarray(reduced)
        merged = orig_sums
        if not same_bits[:count].all():  # the contract's failure case: sum them too
            merged = merged_sums(merged_outs, count, self.batch_size)
        with_outputs = self.signature.with_outputs
        if with_outputs:
            orig_host, merged_host = np.asarray(orig_outs), np.asarray(merged_outs)
            if self.batch_size == 1:
                orig_host, merged_host = orig_host[None], merged_host[None]
        sums = zip(  # tolist(): exact Python floats, one call per array, not per row
            orig_sums[:count].tolist(),
            merged[:count].tolist(),
            abs_diffs[:count].tolist(),
            strict=True,
        )
        return [
            RoundTripAnswer(
                orig_sum=orig_sum,
                merged_sum=merged_sum,
                max_abs_diff=max_abs_diff,
                orig_out=orig_host[row] if with_outputs else None,
                merged_out=merged_host[row] if with_outputs else None,
            )
            for row, (orig_sum, merged_sum, max_abs_diff) in enumerate(sums)
        ]

    def _sets(self, drawn: Sequence[Any], count: int) -> DrawnSets:
        """The parameter sets the executable handed back, one per request (or none)."""
        if not drawn:
            return []
        leaves = [np.asarray(leaf) for leaf in drawn]
        if self.batch_size == 1:
            leaves = [leaf[None] for leaf in leaves]
        return [tuple(np.array(leaf[row]) for leaf in leaves) for row in range(count)]


def _with_rows(
    body: Callable[..., Any], *operands: Any, features: int, rows: int
) -> tuple[Any, ...]:
    """Steps 1-4, and (``rows`` > 0) each request's original output as an output of its own
    (what :func:`~roundtrip.server.numerics.programs.orig_reductions` sums "buffers")."""
    orig_out, merged_out, *drawn = body(*operands, features=features)
    return (orig_out, merged_out, programs.rows_of(orig_out, rows) if rows else (), *drawn)


def merged_sums(merged_outs: Any, count: int, batch_size: int) -> npt.NDArray[Any]:
    """Each request's ``merged_sum``, as eager sums a merged output: ``jnp.sum`` of an array
    of its own. Only when a merged output's bits differ from the original's (the contract's
    failure case), so eager's dispatch per request costs nothing that matters."""
    rows = [merged_outs] if batch_size == 1 else [merged_outs[row] for row in range(count)]
    return np.array([float(jnp.sum(row)) for row in rows], dtype=np.float64)


class FromSeeds(CompiledRoundTrip):
    """Parameters drawn from each request's seed; with ``emit_params`` the executable also
    hands back what it drew (host copies), for the rows tier of the cache."""

    def __init__(
        self,
        signature: ShapeSignature,
        batch_size: int,
        *,
        emit_params: bool = False,
        device: jax.Device | None = None,
        batched: bool = False,
        reductions: Reductions = "sliced",
    ) -> None:
        self.emit_params = emit_params
        self._seed_dtype = seed_operand(0).dtype
        super().__init__(
            signature, batch_size, device=device, batched=batched, reductions=reductions
        )

    def _program(self) -> tuple[Callable[..., Any], Any]:
        single = self.batch_size == 1
        body = programs.one_request if single else programs.batch_from_seeds
        seeds = jax.ShapeDtypeStruct(() if single else (self.batch_size,), self._seed_dtype)
        return functools.partial(body, emit_params=self.emit_params), seeds

    def _parameters(self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None) -> Any:
        if self.batch_size == 1:
            return seed_operand(inputs[0].seed)
        return programs.seed_operands([item.seed for item in inputs], self.batch_size)


class FromSharedParams(CompiledRoundTrip):
    """One parameter set (a repeated seed's, kept on the device) for every request."""

    def _program(self) -> tuple[Callable[..., Any], Any]:
        body = (
            programs.one_from_params if self.batch_size == 1 else programs.batch_from_shared_params
        )
        width, features = self.signature.x_shape[-1], self.signature.features
        return body, param_specs(width, features)

    def _parameters(self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None) -> Any:
        return params


class FromRowParams(CompiledRoundTrip):
    """Each request's own parameter set (host copies), stacked into the batch's operand."""

    def _program(self) -> tuple[Callable[..., Any], Any]:
        width, features = self.signature.x_shape[-1], self.signature.features
        if self.batch_size == 1:
            return programs.one_from_params, param_specs(width, features)
        stacked = tuple(
            jax.ShapeDtypeStruct((self.batch_size, *spec.shape), spec.dtype)
            for spec in param_specs(width, features)
        )
        return programs.batch_from_row_params, stacked

    def _parameters(self, inputs: Sequence[RoundTripInput], params: Sequence[Any] | None) -> Any:
        assert params is not None
        if self.batch_size == 1:
            return params[0]
        return tuple(
            self._stacked(shape, [row_params[leaf] for row_params in params])
            for leaf, shape in enumerate(self._param_shapes)
        )

    def _stacked(self, shape: tuple[int, ...], leaves: Sequence[Any]) -> npt.NDArray[Any]:
        """One parameter leaf of every request, stacked into the batch's operand in one copy;
        padding rows are zeros (the executable never reads them)."""
        stacked = np.empty((self.batch_size, *shape), np.float32)
        np.stack(leaves, out=stacked[: len(leaves)])
        stacked[len(leaves) :] = 0
        return stacked


#: The executables that take their parameters as operands, by where those come from (one
#: that draws them from seeds takes ``emit_params`` too: :class:`FromSeeds`).
EXECUTABLES: dict[ParamSource, type[CompiledRoundTrip]] = {
    "shared": FromSharedParams,
    "rows": FromRowParams,
}
