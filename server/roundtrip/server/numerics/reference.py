"""The eager reference steps of the contract, run in this process on its backend.

The worker uses them to prove, before it reports SERVING, that its compiled
fast path gives the same bits on the backend it runs on (warm-up), and to keep
proving it on a sample of live traffic (audit).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import jax.numpy as jnp
from flax import nnx

from roundtrip.server.values import RoundTripAnswer


def eager_round_trip(seed: int, x: Any, features: int) -> RoundTripAnswer:
    """SPEC.md's steps 1-6, eagerly, in order."""
    return eager_with_outputs(seed, x, features)[0]


def eager_with_outputs(seed: int, x: Any, features: int) -> tuple[RoundTripAnswer, Any, Any]:
    """:func:`eager_round_trip`, and both outputs (device arrays)."""
    x = jnp.asarray(x)
    model = nnx.Linear(
        in_features=x.shape[-1], out_features=int(features), rngs=nnx.Rngs(int(seed))
    )
    orig_out = model(x)
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    merged_out = merged(x)
    abs_diff = jnp.max(jnp.abs(orig_out - merged_out))
    answer = RoundTripAnswer(
        orig_sum=float(orig_out.sum()),
        merged_sum=float(merged_out.sum()),
        max_abs_diff=float(abs_diff),
    )
    return answer, orig_out, merged_out


def same_answer(got: RoundTripAnswer, expected: RoundTripAnswer) -> bool:
    """The three numbers have the same bits (any NaN matches any NaN: the contract says NaN)."""
    return all(
        (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)
        for a, b in zip(got.as_list(), expected.as_list(), strict=True)
    )
