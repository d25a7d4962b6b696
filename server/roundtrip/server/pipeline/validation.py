"""Wire request -> checked, typed :class:`RoundTripInput`, or a :class:`RequestError`.

Everything the eager reference would reject is INVALID_ARGUMENT, naming the field;
everything beyond this worker's limits is INVALID_ARGUMENT too (it can never succeed
here), naming the limit and its setting. All limits are weighed on the declared shape,
before anything is allocated, so ``features = 10**12`` never reaches JAX, and the same
weighing gives the bytes admission reserves (:func:`weigh`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from roundtrip.server.errors import InvalidArgument, LimitExceeded
from roundtrip.server.pipeline.admission import WorkingSet
from roundtrip.server.values import RoundTripInput, canonical_dtype
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.wire import arrays

#: Bytes of one parameter: nnx.Linear keeps float32 parameters by default.
PARAM_ITEMSIZE = 4
#: Most dimensions any array may have (numpy's own limit): ``max_x_rank`` is at most this,
#: and no tensor of any door declares more.
MAX_RANK = 64


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The per-request limits from the worker's configuration."""

    max_x_elements: int
    max_features: int
    max_param_bytes: int
    max_output_elements: int
    max_x_rank: int = 32


def _over_limit(what: str, value: int, limit: int, knob: str) -> LimitExceeded:
    return LimitExceeded(
        f"{what} is {value}, over this worker's limit of {limit} "
        f"({knob}, env ROUNDTRIP_{knob.upper()})"
    )


def weigh(
    request: pb.RoundTripRequest, limits: RequestLimits, *, message_bytes: int | None = None
) -> WorkingSet:
    """Check ``request`` against the contract and ``limits`` on its declared shape alone.

    Nothing is read out of x's payload or allocated: the answer is what
    admission reserves before :func:`decode` runs (and checks the payload).
    ``message_bytes`` is the size of the message x came in: a declared shape
    larger than it cannot match its payload, and is reported as the malformed
    request it is (INVALID_ARGUMENT), not as one over the limits; without it
    the payload is checked here.
    """
    if not request.HasField("x"):
        raise InvalidArgument("x is required: an Array with raw or values")
    features = request.features
    _check_features(features, limits)  # before x: the order errors are reported in
    x = request.x  # each read of a submessage builds its wrapper: once, here
    try:
        shape = arrays.header_shape(x, field="x")
        dtype = arrays.NUMPY_DTYPES[x.dtype]
        if message_bytes is None or (
            not x.values and math.prod(shape) * dtype.itemsize > message_bytes
        ):
            shape = arrays.declared_shape(x, field="x")  # raw is small, or asked for
    except arrays.ArrayFormatError as error:
        raise InvalidArgument(str(error)) from None
    return weigh_shape(shape, dtype, features, limits, request.return_outputs)


@functools.lru_cache(maxsize=1024)
def weigh_shape(
    shape: tuple[int, ...],
    dtype: np.dtype[np.generic],
    features: int,
    limits: RequestLimits,
    with_outputs: bool,
) -> WorkingSet:
    """The contract's rules and ``limits`` for x of ``shape`` and ``dtype`` and ``features``:
    every way in (``RoundTripRequest``, V2's tensors) is checked here, on the shape alone.
    Cached: the requests of a batch mostly share one shape, and then one working set (the
    same object, which groups them cheaply); a refusal is raised anew each time.

    >>> limits = RequestLimits(100, 8, 1024, 100)
    >>> weigh_shape((2, 3), np.dtype("float32"), 4, limits, with_outputs=False).param_bytes
    64
    >>> weigh_shape((0, 3), np.dtype("float32"), 4, limits, with_outputs=False)
    Traceback (most recent call last):
    ...
    roundtrip.server.errors.InvalidArgument: x has no elements (shape [0, 3])
    """
    _check_features(features, limits)  # (again for weigh: first, as the contract lists them)
    if not shape:
        raise InvalidArgument("x has rank 0; it needs rank >= 1 (its last axis is the input width)")
    if len(shape) > limits.max_x_rank:
        raise _over_limit("x's rank", len(shape), limits.max_x_rank, "max_x_rank")
    width = shape[-1]
    if width == 0:
        raise InvalidArgument(
            f"x.shape[-1] is 0 (shape {list(shape)}): the input width must be >= 1"
        )
    elements = math.prod(shape)
    if elements == 0:
        raise InvalidArgument(f"x has no elements (shape {list(shape)})")
    if elements > limits.max_x_elements:
        raise _over_limit("x's element count", elements, limits.max_x_elements, "max_x_elements")
    param_bytes = (width + 1) * features * PARAM_ITEMSIZE
    if param_bytes > limits.max_param_bytes:
        raise _over_limit(
            f"the parameter size for width {width} x features {features}",
            param_bytes,
            limits.max_param_bytes,
            "max_param_bytes",
        )
    output_elements = (elements // width) * features
    if output_elements > limits.max_output_elements:
        raise _over_limit(
            "the output's element count",
            output_elements,
            limits.max_output_elements,
            "max_output_elements",
        )
    x_itemsize, output_itemsize = _itemsizes(dtype)
    return WorkingSet(
        x_bytes=elements * x_itemsize,
        param_bytes=param_bytes,
        output_bytes=output_elements * output_itemsize,
        with_outputs=with_outputs,
        rank=len(shape),
    )


def _check_features(features: int, limits: RequestLimits) -> None:
    if features < 1:
        raise InvalidArgument(f"features must be >= 1 (got {features})")
    if features > limits.max_features:
        raise _over_limit("features", features, limits.max_features, "max_features")


@functools.cache
def _itemsizes(decoded: np.dtype[np.generic]) -> tuple[int, int]:
    """Bytes of one element of x as decoded (or as computed, if larger) and of the outputs."""
    computed = canonical_dtype(decoded)
    return max(decoded.itemsize, computed.itemsize), np.result_type(computed, np.float32).itemsize


def decode(request: pb.RoundTripRequest) -> RoundTripInput:
    """The engine's input for a request :func:`weigh` accepted: x's payload is read and checked
    here (once), after admission."""
    try:
        x = arrays.from_proto(request.x, field="x")
    except arrays.ArrayFormatError as error:
        raise InvalidArgument(str(error)) from None
    return RoundTripInput(
        seed=request.seed, x=x, features=request.features, with_outputs=request.return_outputs
    )
