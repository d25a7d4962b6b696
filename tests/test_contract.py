"""The contract, end to end: the worker's answers equal SPEC.md's eager reference bit for bit."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from reference import numbers, reference, reference_with_outputs

from roundtrip.client import RoundTripClient
from roundtrip.client.messages import build_request
from roundtrip.v1 import roundtrip_pb2 as pb
from roundtrip.v1 import roundtrip_pb2_grpc as pb_grpc

SEEDS = [0, 1, -1, 2**31, 2**32 + 5, 2**63 - 1, -(2**63), 123456789]
DTYPES = ["float32", "float64", "float16", "bfloat16"]


def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def test_worked_example_matches_spec(client: RoundTripClient) -> None:
    result = client.round_trip(0, [1.0, 2.0, 3.0], 4)
    assert np.float32(result.orig_sum) == np.float32(-4.2219334)
    assert result.orig_sum == result.merged_sum
    assert result.max_abs_diff == 0.0
    assert np.array_equal(numbers(result), reference(0, np.array([1, 2, 3], dtype=np.float32), 4))


def generated_cases() -> list[tuple[int, tuple[int, ...], int, str, bool]]:
    """A seeded grid of 240 cases: every listed seed, widths and features 1..1024, 4 dtypes,
    raw and values paths, rank 1 and 2. Shapes repeat across seeds so the worker compiles
    each signature once."""
    rng = np.random.default_rng(2026)
    widths = [1, 2, 3, 7, 64, 100, 513, 1024]
    features = [1, 4, 64, 255, 1024]
    cases: list[tuple[int, tuple[int, ...], int, str, bool]] = []
    for index in range(240):
        width = widths[index % len(widths)]
        feature = features[(index // len(widths)) % len(features)]
        rank2 = index % 3 == 0
        shape = (int(rng.integers(2, 4)), width) if rank2 else (width,)
        if width * feature > 300_000:  # keep the eager oracle fast on 2 cores
            shape = (width,)
        cases.append((SEEDS[index % len(SEEDS)], shape, feature, DTYPES[index % 4], index % 2 == 0))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "shape", "features", "dtype", "use_values"), generated_cases())
def test_generated_case_equals_reference(
    client: RoundTripClient,
    seed: int,
    shape: tuple[int, ...],
    features: int,
    dtype: str,
    use_values: bool,
) -> None:
    rng = np.random.default_rng(abs(seed) % 2**32 + features)
    x = as_dtype(rng.standard_normal(shape), dtype)
    expected, orig_out, merged_out = reference_with_outputs(seed, x, features)
    if use_values:
        result = values_round_trip(client, seed, x, features, dtype)
    else:
        result = client.round_trip(seed, x, features, dtype=dtype, return_outputs=True)
        assert result.orig_out is not None
        assert np.array_equal(result.orig_out, orig_out)
        assert result.merged_out is not None
        assert np.array_equal(result.merged_out, merged_out)
    assert np.array_equal(numbers(result), expected)


def values_round_trip(
    client: RoundTripClient, seed: int, x: np.ndarray, features: int, dtype: str
) -> object:
    """Send x through the JSON-friendly ``values`` path, as grpcurl callers do."""
    request = build_request(seed, x, features, dtype=dtype)
    request.x.ClearField("raw")
    request.x.values.extend(x.astype(np.float64).ravel().tolist())
    stub = pb_grpc.RoundTripServiceStub(client._channel)
    response = stub.RoundTrip(request, timeout=60)
    return client_result(response)


def client_result(response: pb.RoundTripResponse) -> object:
    from roundtrip.client.messages import parse_response

    return parse_response(response)


def test_outputs_equal_reference_outputs(client: RoundTripClient) -> None:
    x = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    result = client.round_trip(7, x, 3, return_outputs=True)
    expected, orig_out, merged_out = reference_with_outputs(7, x, 3)
    assert np.array_equal(numbers(result), expected)
    assert result.orig_out is not None
    assert result.merged_out is not None
    assert result.orig_out.dtype == np.float32
    assert result.orig_out is not None
    assert np.array_equal(result.orig_out, orig_out)
    assert result.merged_out is not None
    assert np.array_equal(result.merged_out, merged_out)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_x_gives_nan(client: RoundTripClient, bad: float) -> None:
    x = np.array([1.0, bad, 3.0], np.float32)
    result = client.round_trip(0, x, 4)
    assert all(np.isnan(value) for value in result.as_list())
    assert np.array_equal(numbers(result), reference(0, x, 4), equal_nan=True)


def test_seed_keeps_low_32_bits_like_the_reference(client: RoundTripClient) -> None:
    x = [1.0, 2.0, 3.0]
    assert client.round_trip(0, x, 4) == client.round_trip(2**32, x, 4)
    assert client.round_trip(-1, x, 4) == client.round_trip(2**32 - 1, x, 4)


def test_rank_three_x_sums_over_everything(client: RoundTripClient) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 10
    assert np.array_equal(numbers(client.round_trip(3, x, 5)), reference(3, x, 5))


def test_float_seed_and_features_accepted_when_integral(client: RoundTripClient) -> None:
    # The typed API says int; a caller without types (JSON-fed, say) may send 4.0.
    assert client.round_trip(0.0, [1, 2, 3], 4.0) == client.round_trip(0, [1, 2, 3], 4)  # type: ignore[arg-type]  # floats


@pytest.mark.parametrize(("seed", "features"), [(0.5, 4), (0, 4.25), (float("nan"), 4), (True, 4)])
def test_non_integral_seed_or_features_is_value_error(
    client: RoundTripClient, seed: object, features: object
) -> None:
    with pytest.raises(ValueError, match="integer"):
        client.round_trip(seed, [1, 2, 3], features)  # type: ignore[arg-type]  # the wrong types on purpose


def test_same_request_twice_gives_same_bits(client: RoundTripClient) -> None:
    first, second = (client.round_trip(9, [0.5] * 64, 64) for _ in range(2))
    assert first == second


def test_every_listed_seed_is_covered() -> None:
    seeds = {case[0] for case in generated_cases()}
    assert {-1, 2**31, 2**32 + 5, 2**63 - 1} <= seeds
    assert len(generated_cases()) >= 200
    assert set(itertools.chain.from_iterable([[c[3]] for c in generated_cases()])) == set(DTYPES)
