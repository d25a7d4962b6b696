"""Python arguments -> ``RoundTripRequest``, and ``RoundTripResponse`` -> :class:`RoundTripResult`.

Shared by the sync and asyncio clients, so both accept and return the same things.

>>> request = build_request(0, [1, 2, 3], 4.0)
>>> request.features, list(request.x.shape)
(4, [3])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from roundtrip.client import errors
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.wire import arrays
from roundtrip.wire.results import RoundTripResult as RoundTripResult

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Integer = int | np.integer[Any]
"""What ``seed`` and ``features`` take: a Python or numpy integer (an integral float such as
``4.0`` is accepted at run time too; ``4.5`` raises ``ValueError``)."""


def as_int64(name: str, value: Any) -> int:
    """``value`` as an int64; floats only when integral (``4.0`` yes, ``4.5`` no)."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be an integer, not a bool")
    if isinstance(value, numbers.Integral):
        result = int(value)
    elif isinstance(value, numbers.Real):
        as_float = float(value)
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise ValueError(f"{name} must be an integer; {value!r} is not integral")
        result = int(as_float)
    else:
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if not INT64_MIN <= result <= INT64_MAX:
        raise ValueError(f"{name} {result} does not fit in int64")
    return result


def build_request(
    seed: Integer,
    x: npt.ArrayLike,
    features: Integer,
    *,
    dtype: str = "float32",
    return_outputs: bool = False,
) -> pb.RoundTripRequest:
    """A ``RoundTripRequest`` with ``x`` sent as ``raw`` bytes of ``dtype``.

    Raises ``ValueError`` (before anything is sent) for a seed or features that is not an
    int64, an ``x`` numpy cannot read as numbers, or a ``dtype`` with no wire encoding.
    """
    return pb.RoundTripRequest(
        seed=as_int64("seed", seed),
        x=arrays.to_proto(x, dtype),
        features=as_int64("features", features),
        return_outputs=return_outputs,
    )


def parse_response(response: pb.RoundTripResponse) -> RoundTripResult:
    """The typed result of a response; outputs decoded only when present."""
    has_outputs = response.HasField("orig_out") and response.HasField("merged_out")
    return RoundTripResult(
        orig_sum=response.orig_sum,
        merged_sum=response.merged_sum,
        max_abs_diff=response.max_abs_diff,
        orig_out=arrays.from_proto(response.orig_out, field="orig_out") if has_outputs else None,
        merged_out=(
            arrays.from_proto(response.merged_out, field="merged_out") if has_outputs else None
        ),
    )


Outcome = RoundTripResult | errors.RoundTripError
"""One request's outcome among many (a stream's or a batch's): its result, or its error."""


def parse_outcome(message: pb.RoundTripStreamResponse | pb.RoundTripBatchOutcome) -> Outcome:
    """A stream answer or a batch outcome as its result, or as its error (not raised)."""
    if message.HasField("error"):
        return errors.from_rpc_code(message.error.code, message.error.message)
    return parse_response(message.response)


def build_batch(
    requests: Iterable[tuple[Integer, npt.ArrayLike, Integer]],
    *,
    dtype: str = "float32",
    return_outputs: bool = False,
) -> pb.RoundTripBatchRequest:
    """A ``RoundTripBatchRequest`` of ``(seed, x, features)`` tuples (``ValueError`` as for
    :func:`build_request`, naming the request's index).

    >>> len(build_batch([(0, [1.0, 2.0], 3), (1, [4.0], 1)]).requests)
    2
    """
    batch = pb.RoundTripBatchRequest()
    for index, (seed, x, features) in enumerate(requests):
        try:
            request = build_request(seed, x, features, dtype=dtype, return_outputs=return_outputs)
        except ValueError as error:
            raise ValueError(f"request {index}: {error}") from None
        batch.requests.append(request)
    return batch
