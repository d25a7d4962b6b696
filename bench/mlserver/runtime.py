"""MLServer beside the worker in the benchmark: a runtime serving roundtrip's computation over V2.

It runs in MLServer's own environment (``.tools/mlserver``, from requirements.txt, with the
worker's pinned JAX and Flax), started by bench/launch.py with ``mlserver start`` on a settings
folder it writes. ``jit`` (model parameter ``mode``): the layer's forward pass and sums are
one ``nnx.jit`` per (shape, features), as a user of MLServer would write it; ``eager``:
SPEC.md's steps as written. bench/checks.py checks the answer's bits against the eager reference
before any load and reports the mode it measured.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


def eager(seed: int, x: Any, features: int) -> list[float]:
    x = jnp.asarray(x)
    model = nnx.Linear(in_features=x.shape[-1], out_features=features, rngs=nnx.Rngs(seed))
    orig_out = model(x)
    graphdef, state = nnx.split(model)
    merged_out = nnx.merge(graphdef, state)(x)
    return [
        float(orig_out.sum()),
        float(merged_out.sum()),
        float(jnp.max(jnp.abs(orig_out - merged_out))),
    ]


@nnx.jit(static_argnums=(2,))
def _jitted(key: jax.Array, x: jax.Array, features: int) -> jax.Array:
    model = nnx.Linear(in_features=x.shape[-1], out_features=features, rngs=nnx.Rngs(key))
    orig_out = model(x)
    graphdef, state = nnx.split(model)
    merged_out = nnx.merge(graphdef, state)(x)
    return jnp.stack([orig_out.sum(), merged_out.sum(), jnp.max(jnp.abs(orig_out - merged_out))])


def jitted(seed: int, x: Any, features: int) -> list[float]:
    key = jax.random.key(np.uint32(seed & 0xFFFFFFFF))
    return [float(v) for v in np.asarray(_jitted(key, jnp.asarray(x), features))]


class RoundTripRuntime(MLModel):  # type: ignore[misc]  # MLServer lives in its own environment, untyped here
    async def load(self) -> bool:
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        self._compute = jitted if extra.get("mode", "jit") == "jit" else eager
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        seed = int(inputs["seed"].ravel()[0])
        features = int(inputs["features"].ravel()[0])
        result = self._compute(seed, inputs["x"], features)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[ResponseOutput(name="result", datatype="FP32", shape=[1, 3], data=result)],
        )
