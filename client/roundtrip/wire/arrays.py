"""The one codec between numpy arrays and the wire's ``roundtrip.v1.Array``.

Client and server both use it, so the two sides cannot disagree on byte order,
dtype names or the ``raw``/``values`` rules. Decoding checks everything the
message itself can get wrong (dtype, shape, lengths) and raises
:class:`ArrayFormatError` naming the offending field; limits that depend on
the server's configuration are the server's business.

>>> import numpy as np
>>> msg = to_proto(np.array([1.0, 2.0, 3.0], dtype=np.float32))
>>> from_proto(msg, field="x").tolist()
[1.0, 2.0, 3.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import numpy.typing as npt

from roundtrip.v1 import roundtrip_pb2 as pb

#: Wire dtype -> little-endian numpy dtype. DTYPE_UNSPECIFIED reads as float32.
NUMPY_DTYPES: Mapping[int, np.dtype[np.generic]] = {
    pb.DTYPE_UNSPECIFIED: np.dtype("<f4"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}

#: numpy dtype name -> wire dtype, for encoding.
WIRE_DTYPES: Mapping[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float64": pb.DTYPE_FLOAT64,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}


class ArrayFormatError(ValueError):
    """An ``Array`` message that does not describe a valid array.

    ``field`` is the dotted path of the offending field (``x.raw``), so the
    server can put it into an INVALID_ARGUMENT message a caller can act on.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def dtype_name(wire_dtype: int) -> str:
    """The enum name of a wire dtype (``DTYPE_FLOAT32``), or its number if unknown."""
    try:
        return pb.Dtype.Name(wire_dtype)  # type: ignore[arg-type]
    except ValueError:
        return str(wire_dtype)


def to_proto(array: npt.ArrayLike, dtype: str | np.dtype[np.generic] | None = None) -> pb.Array:
    """Encode an array as ``raw`` little-endian bytes of ``dtype`` (default: float32).

    Anything ``numpy.asarray`` accepts works; the cast follows numpy's rules.
    """
    target = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
    if target.name not in WIRE_DTYPES:
        raise ValueError(
            f"dtype {target.name} has no wire encoding; use one of {sorted(WIRE_DTYPES)}"
        )
    data = np.asarray(array, dtype=target.newbyteorder("<"))
    return pb.Array(
        dtype=WIRE_DTYPES[target.name],  # type: ignore[arg-type]
        shape=data.shape,
        raw=np.ascontiguousarray(data).tobytes(),
    )


def header_shape(msg: pb.Array, *, field: str) -> tuple[int, ...]:
    """The shape ``msg`` declares, from its dtype, shape and values alone: ``raw`` is not read.

    Lets the server weigh a request against its limits and its memory budget
    before it copies anything out of the message (each read of a bytes field
    copies it, and x may be 64 MiB); :func:`declared_shape` then checks the
    payload.

    >>> header_shape(pb.Array(shape=[2, 3]), field="x")
    (2, 3)
    """
    if msg.dtype not in NUMPY_DTYPES:
        known = ", ".join(pb.Dtype.Name(d) for d in NUMPY_DTYPES)  # type: ignore[arg-type]
        raise ArrayFormatError(f"{field}.dtype", f"unknown value {msg.dtype}; use one of {known}")
    shape = tuple(msg.shape)  # ints already (int64 on the wire)
    if shape and min(shape) < 0:
        axis, dim = next((axis, dim) for axis, dim in enumerate(shape) if dim < 0)
        raise ArrayFormatError(f"{field}.shape", f"dimension {axis} is negative ({dim})")
    values = len(msg.values)
    if values and not shape:
        return (values,)
    if values and math.prod(shape) != values:
        raise ArrayFormatError(
            f"{field}.values", f"{values} values, but shape {list(shape)} needs {math.prod(shape)}"
        )
    return shape


def declared_shape(msg: pb.Array, *, field: str, raw: bytes | None = None) -> tuple[int, ...]:
    """The shape ``msg`` describes, checked against its own payload, without decoding it.

    ``raw`` is ``msg.raw`` when the caller already holds it (each read copies it).
    """
    shape = header_shape(msg, field=field)
    if raw is None:
        raw = msg.raw
    if raw and msg.values:
        raise ArrayFormatError(field, "set exactly one of raw or values, not both")
    if msg.values:
        return shape
    count = math.prod(shape)
    if not raw and count != 0:
        raise ArrayFormatError(field, "set exactly one of raw or values (neither is set)")
    itemsize = NUMPY_DTYPES[msg.dtype].itemsize
    if len(raw) != count * itemsize:
        raise ArrayFormatError(
            f"{field}.raw",
            f"{len(raw)} bytes, but shape {list(shape)} of {dtype_name(msg.dtype)} "
            f"needs {count * itemsize}",
        )
    return shape


def from_proto(msg: pb.Array, *, field: str) -> npt.NDArray[np.generic]:
    """Decode ``msg`` into a read-only numpy array of its dtype and shape."""
    raw = msg.raw  # read once: every read copies
    shape = declared_shape(msg, field=field, raw=raw)
    dtype = NUMPY_DTYPES[msg.dtype]
    if msg.values:
        # Out-of-range values become inf, as numpy.asarray makes them: documented, not noise.
        with np.errstate(over="ignore"):
            return np.asarray(msg.values, dtype=dtype).reshape(shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
