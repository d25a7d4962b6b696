"""The primitive-fencing interpreter: a traced function replayed primitive by primitive
inside ``jax.jit``, so XLA compiles it without rewriting across what eager runs apart.

Eager JAX runs every primitive as its own XLA computation. A plain ``jax.jit`` of the same
steps lets XLA's algebraic simplifier rewrite across them (at input width 1 it folds the
initializer's ``sqrt(1 / fan_in) / 0.8796...`` into the multiply) and fold constants on the
host at compile time (on an H200 the host's ``erf`` of the initializer's bounds was one ulp
from the device's). :func:`isolate_primitives` puts an optimization barrier on every
floating-point intermediate and on every literal and constant of any dtype, so each
primitive computes what eager's would. docs/numerics.md has the whole argument.

>>> import jax.numpy as jnp
>>> f = isolate_primitives(lambda a: (a * 2.0 + 1.0).sum())
>>> float(jax.jit(f)(jnp.ones(3)))
9.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp


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
    """``fn`` with every primitive fenced off from its neighbours, for use under ``jax.jit``."""

    def isolated(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval_isolated(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return isolated
