"""The codec between numpy and roundtrip.v1.Array."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.wire import arrays

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_raw_round_trip_is_exact(dtype: type, data: st.DataObject) -> None:
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    values = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e4, 1e4)))
    original: np.ndarray = values.astype(dtype)
    decoded = arrays.from_proto(arrays.to_proto(original, np.dtype(dtype)), field="x")
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.tobytes() == original.tobytes()


def test_raw_is_little_endian() -> None:
    msg = arrays.to_proto(np.array([1.0], dtype=">f4"))
    assert msg.raw == b"\x00\x00\x80\x3f"


def test_values_are_cast_like_numpy_asarray() -> None:
    msg = pb.Array(dtype=pb.DTYPE_FLOAT16, values=[0.1, 70000.0])
    decoded = arrays.from_proto(msg, field="x")
    with np.errstate(over="ignore"):
        expected = np.asarray([0.1, 70000.0], np.float16)
    assert decoded.tobytes() == expected.tobytes()
    assert np.isinf(decoded[1])


def test_unspecified_dtype_reads_as_float32() -> None:
    assert arrays.from_proto(pb.Array(values=[1.0]), field="x").dtype == np.float32


def test_values_with_empty_shape_are_one_dimensional() -> None:
    assert arrays.declared_shape(pb.Array(values=[1, 2, 3]), field="x") == (3,)


def test_unencodable_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="no wire encoding"):
        arrays.to_proto(np.array([1], np.int32), np.dtype(np.int32))


def test_errors_name_the_field() -> None:
    with pytest.raises(arrays.ArrayFormatError) as caught:
        arrays.declared_shape(
            pb.Array(dtype=pb.DTYPE_FLOAT64, shape=[2], raw=b"\0" * 15), field="x"
        )
    assert caught.value.field == "x.raw"
    assert "15 bytes" in str(caught.value)
    assert "needs 16" in str(caught.value)
