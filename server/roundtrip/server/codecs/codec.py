"""``roundtrip.v1`` messages to and from the pipeline's values, for the doors that speak it
(RoundTrip, RoundTripBatch, RoundTripStream): a request weighed on its declared shape with
its payload decoded only once admitted (the checks are
:mod:`~roundtrip.server.pipeline.validation`'s), and an answer encoded.

>>> from roundtrip.server.pipeline.validation import RequestLimits
>>> request = pb.RoundTripRequest(seed=0, x=pb.Array(values=[1.0, 2.0, 3.0]), features=4)
>>> size, decode = weighed(request, RequestLimits(100, 100, 10_000, 100), message_bytes=40)
>>> size.param_bytes, decode().x.tolist()
(64, [1.0, 2.0, 3.0])
>>> encode_result(RoundTripAnswer(1.5, 1.5, 0.0)).orig_sum
1.5
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from roundtrip.server.pipeline.admission import WorkingSet
from roundtrip.server.pipeline.validation import RequestLimits, decode, weigh
from roundtrip.server.values import RoundTripAnswer, RoundTripInput
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.wire import arrays


def weighed(
    request: pb.RoundTripRequest, limits: RequestLimits, *, message_bytes: int
) -> tuple[WorkingSet, Callable[[], RoundTripInput]]:
    """What admission needs of ``request``: its working set, weighed on the declared shape
    (raising what the contract or the limits refuse), and how to decode it once admitted."""
    return weigh(request, limits, message_bytes=message_bytes), functools.partial(decode, request)


def answer_wire_bytes(size: WorkingSet) -> int:
    """An upper bound of the bytes a ``RoundTripResponse`` for a request weighed at ``size``
    takes on the wire: the three numbers, and with outputs both arrays (raw bytes, shape,
    dtype and their tags). What the door checks against ``max_message_bytes`` before any
    compute, since an answer gRPC cannot send is a call that can never succeed.

    >>> no_outputs, outputs = WorkingSet(12, 64, 16, False), WorkingSet(12, 64, 16, True)
    >>> answer_wire_bytes(no_outputs), answer_wire_bytes(outputs)
    (32, 118)
    """
    if not size.with_outputs:
        return 32
    return 32 + 2 * (size.output_bytes + 16 + 11 * size.rank)


def encode_result(
    result: RoundTripAnswer, response: pb.RoundTripResponse | None = None
) -> pb.RoundTripResponse:
    """The answer as a ``RoundTripResponse``; written into ``response`` when given (a batch
    outcome's own field, so it is not built apart and copied in)."""
    if response is None:
        response = pb.RoundTripResponse()
    response.orig_sum = result.orig_sum
    response.merged_sum = result.merged_sum
    response.max_abs_diff = result.max_abs_diff
    if result.orig_out is not None and result.merged_out is not None:
        dtype = result.orig_out.dtype
        response.orig_out.CopyFrom(arrays.to_proto(result.orig_out, dtype))
        response.merged_out.CopyFrom(arrays.to_proto(result.merged_out, dtype))
    return response
