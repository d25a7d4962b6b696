"""The contract's oracle: SPEC.md's eager reference steps, verbatim.

Kept apart from the server's code on purpose: the worker is judged against
this, bit for bit, never against itself.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax.numpy as jnp
import numpy as np
from flax import nnx


def reference(seed: int, x: Any, features: int) -> np.ndarray:
    """``[orig_sum, merged_sum, max_abs_diff]`` as float64, exactly as SPEC.md computes it."""
    return reference_with_outputs(seed, x, features)[0]


def reference_with_outputs(seed: int, x: Any, features: int) -> tuple[np.ndarray, Any, Any]:
    """The three numbers plus ``orig_out`` and ``merged_out`` as numpy arrays."""
    x = jnp.asarray(x)
    model = nnx.Linear(
        in_features=x.shape[-1], out_features=int(features), rngs=nnx.Rngs(int(seed))
    )
    orig_out = model(x)
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    merged_out = merged(x)
    abs_diff = jnp.max(jnp.abs(orig_out - merged_out))
    result = jnp.array([float(orig_out.sum()), float(merged_out.sum()), float(abs_diff)])
    numbers = np.array([float(v) for v in result], dtype=np.float64)
    return numbers, np.asarray(orig_out), np.asarray(merged_out)


@runtime_checkable
class Answered(Protocol):
    """An answer: the client's RoundTripResult, the engine's RoundTripAnswer."""

    def as_list(self) -> list[float]: ...


def numbers(outcome: object) -> np.ndarray:
    """An answer's three numbers as ``reference`` gives them, for ``np.array_equal``; an
    error where an answer was due fails here, naming the error."""
    assert isinstance(outcome, Answered), f"an answer was due, got {outcome!r}"
    return np.array(outcome.as_list(), dtype=np.float64)
