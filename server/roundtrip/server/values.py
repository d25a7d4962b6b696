"""The values a request becomes on its way through the worker: what every codec, the
batcher, the audit and the engine pass between them. Importing this module does not start
JAX; the first signature worked out does (JAX decides which dtypes it computes in).

>>> import numpy as np
>>> item = RoundTripInput(7, np.ones((2, 3), np.float64), 4)
>>> str(item.signature)  # float64 computes as float32 unless JAX's 64-bit mode is on
'float32[2x3]->4'
>>> RoundTripAnswer(1.0, 1.0, 0.0).as_list()
[1.0, 1.0, 0.0]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from roundtrip.wire.results import RoundTripResult


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


#: One request's answer as the engine computes it: the contract's three numbers (float32
#: values, held as Python floats) and, when asked for, both outputs; the same value the
#: client hands its callers. Each door encodes it for its own wire.
RoundTripAnswer = RoundTripResult


@functools.cache
def canonical_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype ``jnp.asarray`` gives an array of ``dtype`` (float64 -> float32 unless x64).

    Cached: it runs per request, and JAX's 64-bit mode is fixed when the worker starts.
    """
    import jax

    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


@functools.cache
def canonical_name(dtype: np.dtype[Any]) -> str:
    """:func:`canonical_dtype`'s name (``"float32"``), cached: numpy works a dtype's name
    out in Python on every read, and a signature needs it per request."""
    return canonical_dtype(dtype).name


def x64_enabled() -> bool:
    """Whether JAX's 64-bit mode is on (``JAX_ENABLE_X64``): int64 stays int64."""
    return bool(canonical_dtype(np.dtype(np.int64)) == np.int64)
