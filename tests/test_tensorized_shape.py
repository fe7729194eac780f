"""Tests for factlin/tensorized_shape.py: tables, brute-force reference, properties, errors."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factlin.tensorized_shape import DEFAULT_ORDER, get_tensorized_shape, tensorize_dim


# --------------------------------------------------------------------------------------------
# Plain reference: enumerate every factorization by trial division (small n only)
# --------------------------------------------------------------------------------------------
def _all_factorizations(n: int, d: int, min_dim: int) -> list[tuple[int, ...]]:
    """Every non-decreasing tuple of ``d`` ints ``>= min_dim`` whose product is ``n``."""
    if d == 1:
        return [(n,)] if n >= min_dim else []
    found = []
    for f in range(min_dim, n + 1):
        if f**d > n:
            break
        if n % f == 0:
            found.extend((f, *tail) for tail in _all_factorizations(n // f, d - 1, f))
    return found


@cache
def _reference(n: int, d: int, min_dim: int) -> tuple[int, ...] | None:
    """Most balanced factorization by brute force: min largest, max smallest, then lexicographic
    from the largest factor down.  ``None`` if there is none (``d >= 2``)."""
    if d == 1:
        return (n,)
    candidates = _all_factorizations(n, d, min_dim)
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[-1], -c[0], c[::-1]))


def _check_shape(in_features: int, out_features: int, order: int, min_dim: int) -> None:
    """Assert every documented property of ``get_tensorized_shape`` against the reference."""
    in_shape, out_shape = get_tensorized_shape(in_features, out_features, order, min_dim)
    d = len(in_shape)
    assert len(out_shape) == d
    assert 1 <= d <= order
    assert math.prod(in_shape) == in_features
    assert math.prod(out_shape) == out_features
    for mode in (*in_shape, *out_shape):
        assert type(mode) is int
    assert list(in_shape) == sorted(in_shape) and list(out_shape) == sorted(out_shape)
    if d > 1:
        assert min(in_shape + out_shape) >= min_dim
        assert in_shape == _reference(in_features, d, min_dim)
        assert out_shape == _reference(out_features, d, min_dim)
    else:
        assert (in_shape, out_shape) == ((in_features,), (out_features,))
    # d is the largest feasible number of modes: one more is impossible for at least one side.
    if d < order:
        assert (
            _reference(in_features, d + 1, min_dim) is None
            or _reference(out_features, d + 1, min_dim) is None
        )


def test_reference_agrees_with_a_known_answer() -> None:
    assert _reference(768, 3, 2) == (8, 8, 12)
    assert _reference(7, 2, 2) is None


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
TENSORIZE_DIM_CASES = [
    # (n, order, min_dim, expected)
    (768, 3, 2, (8, 8, 12)),  # not tltorch's (4, 12, 16)
    (3072, 3, 2, (12, 16, 16)),  # largest factor 16, beats (8, 16, 24)
    (1024, 3, 2, (8, 8, 16)),  # ties (4, 16, 16) on the largest, wins on the smallest
    (4096, 3, 2, (16, 16, 16)),
    (1000, 3, 2, (10, 10, 10)),
    (5376, 3, 2, (16, 16, 21)),  # 7 * 768
    (768, 2, 2, (24, 32)),
    (768, 8, 2, (2, 2, 2, 2, 2, 2, 3, 4)),
    (36, 2, 2, (6, 6)),
    (8, 3, 2, (2, 2, 2)),
    (12, 3, 2, (2, 2, 3)),
    (12, 2, 3, (3, 4)),
    (97, 1, 2, (97,)),
    (1, 1, 2, (1,)),
    (3, 1, 5, (3,)),  # order 1 ignores min_dim
    (7, 3, 1, (1, 1, 7)),  # min_dim=1 allows size-1 modes
    (6, 3, 1, (1, 2, 3)),
    (1, 2, 1, (1, 1)),
    (8648640, 8, 2, (5, 6, 6, 6, 7, 8, 11, 13)),
]


@pytest.mark.parametrize(("n", "order", "min_dim", "expected"), TENSORIZE_DIM_CASES)
def test_tensorize_dim_table(n: int, order: int, min_dim: int, expected: tuple[int, ...]) -> None:
    result = tensorize_dim(n, order, min_dim)
    assert result == expected
    assert all(type(f) is int for f in result)
    if n <= 5000:
        assert result == _reference(n, order, min_dim)


SHAPE_CASES = [
    # (in_features, out_features, order, min_dim, expected)
    (768, 3072, None, 2, ((8, 8, 12), (12, 16, 16))),
    (3072, 768, None, 2, ((12, 16, 16), (8, 8, 12))),
    (1024, 1024, None, 2, ((8, 8, 16), (8, 8, 16))),
    (4096, 4096, None, 2, ((16, 16, 16), (16, 16, 16))),
    (1000, 1000, None, 2, ((10, 10, 10), (10, 10, 10))),
    (768, 768, 2, 2, ((24, 32), (24, 32))),
    (768, 768, 1, 2, ((768,), (768,))),
    (768, 768, 8, 2, ((2, 2, 2, 2, 2, 2, 3, 4), (2, 2, 2, 2, 2, 2, 3, 4))),
    # fallbacks to fewer modes
    (97, 768, None, 2, ((97,), (768,))),  # prime size
    (768, 97, None, 2, ((768,), (97,))),
    (7, 768, None, 2, ((7,), (768,))),  # no size-1 padding by default ...
    (7, 768, None, 1, ((1, 1, 7), (8, 8, 12))),  # ... unless min_dim=1 asks for it
    (5376, 768, None, 2, ((16, 16, 21), (8, 8, 12))),
    (4, 4, 3, 2, ((2, 2), (2, 2))),
    (6, 6, 3, 2, ((2, 3), (2, 3))),
    (12, 12, 3, 2, ((2, 2, 3), (2, 2, 3))),
    (4, 12, 3, 2, ((2, 2), (3, 4))),
    (6, 768, 3, 2, ((2, 3), (24, 32))),
    (8, 768, 3, 2, ((2, 2, 2), (8, 8, 12))),
    (12, 12, 3, 3, ((3, 4), (3, 4))),
    (3, 5, 3, 4, ((3,), (5,))),  # sizes below min_dim
    # 1 x N and N x 1 layers: 1 has no factor >= 2
    (1, 768, None, 2, ((1,), (768,))),
    (768, 1, None, 2, ((768,), (1,))),
    (1, 1, None, 2, ((1,), (1,))),
    (1, 1, 2, 1, ((1, 1), (1, 1))),
]


@pytest.mark.parametrize(
    ("in_features", "out_features", "order", "min_dim", "expected"), SHAPE_CASES
)
def test_get_tensorized_shape_table(
    in_features: int,
    out_features: int,
    order: int | None,
    min_dim: int,
    expected: tuple[tuple[int, ...], tuple[int, ...]],
) -> None:
    result = get_tensorized_shape(in_features, out_features, order=order, min_dim=min_dim)
    assert result == expected
    _check_shape(in_features, out_features, DEFAULT_ORDER if order is None else order, min_dim)


def test_default_order_is_three() -> None:
    assert DEFAULT_ORDER == 3
    assert get_tensorized_shape(768, 3072) == get_tensorized_shape(768, 3072, order=3)


def test_numpy_integers_become_python_ints() -> None:
    in_shape, out_shape = get_tensorized_shape(
        np.int64(768), np.int32(3072), order=np.int64(3), min_dim=np.int16(2)
    )
    assert (in_shape, out_shape) == ((8, 8, 12), (12, 16, 16))
    assert all(type(f) is int for f in in_shape + out_shape)
    one_in, one_out = get_tensorized_shape(np.int64(97), np.int64(1))
    assert type(one_in[0]) is int and type(one_out[0]) is int
    assert all(type(f) is int for f in tensorize_dim(np.uint32(1000), np.int8(3)))


@pytest.mark.parametrize("n", [8648640, 7207200, 9699690, 10**7, 2**23, 9999991, 2 * 9999991])
@pytest.mark.parametrize("order", [2, 3, 5, 8])
def test_large_sizes_are_fast_and_consistent(n: int, order: int) -> None:
    in_shape, out_shape = get_tensorized_shape(n, 768, order=order)
    assert math.prod(in_shape) == n and math.prod(out_shape) == 768
    assert len(in_shape) == len(out_shape)
    if len(in_shape) > 1:
        assert min(in_shape + out_shape) >= 2
        # no factor can be below the d-th root of n when it is the largest one
        assert in_shape[-1] ** len(in_shape) >= n


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------
BAD_SHAPE_ARGS = [
    # (kwargs, error, message pattern)
    ({"in_features": 0}, ValueError, r"in_features must be an int >= 1, got 0"),
    ({"in_features": -5}, ValueError, r"in_features must be an int >= 1, got -5"),
    ({"out_features": 0}, ValueError, r"out_features must be an int >= 1, got 0"),
    ({"in_features": 7.0}, TypeError, r"in_features must be an int >= 1, got 7\.0 of type float"),
    ({"in_features": True}, TypeError, r"in_features must be an int >= 1, got True of type bool"),
    ({"out_features": "768"}, TypeError, r"out_features must be .*got '768' of type str"),
    ({"out_features": np.bool_(True)}, TypeError, r"out_features must be an int >= 1"),
    ({"order": 0}, ValueError, r"order must be None or an int >= 1, got 0"),
    ({"order": 2.5}, TypeError, r"order must be None or an int >= 1, got 2\.5 of type float"),
    ({"order": False}, TypeError, r"order must be None or an int >= 1, got False of type bool"),
    ({"min_dim": 0}, ValueError, r"min_dim must be an int >= 1, got 0"),
    ({"min_dim": None}, TypeError, r"min_dim must be an int >= 1, got None of type NoneType"),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), BAD_SHAPE_ARGS)
def test_get_tensorized_shape_rejects_bad_input(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    arguments: dict[str, object] = {"in_features": 768, "out_features": 3072, **kwargs}
    with pytest.raises(error, match=pattern):
        get_tensorized_shape(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "error", "pattern"),
    [
        ((0, 3), ValueError, r"n must be an int >= 1, got 0"),
        ((768, 0), ValueError, r"order must be an int >= 1, got 0"),
        ((768, None), TypeError, r"order must be an int >= 1, got None"),
        ((768, 3, 0), ValueError, r"min_dim must be an int >= 1, got 0"),
        ((True, 3), TypeError, r"n must be an int >= 1, got True of type bool"),
        ((7, 3), ValueError, r"n=7 cannot be written as a product of order=3 factors .*min_dim=2"),
        ((12, 3, 3), ValueError, r"n=12 cannot be written .*order=3 .*min_dim=3"),
    ],
)
def test_tensorize_dim_rejects_bad_input(
    args: tuple[object, ...], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        tensorize_dim(*args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
small_sizes = st.integers(min_value=1, max_value=5000)


@settings(deadline=None, max_examples=200)
@given(
    in_features=small_sizes,
    out_features=small_sizes,
    order=st.integers(min_value=1, max_value=6),
    min_dim=st.integers(min_value=1, max_value=4),
)
def test_shape_properties_against_reference(
    in_features: int, out_features: int, order: int, min_dim: int
) -> None:
    _check_shape(in_features, out_features, order, min_dim)


@settings(deadline=None, max_examples=200)
@given(in_features=small_sizes, out_features=small_sizes, order=st.integers(1, 6))
def test_swapping_sides_swaps_the_result(in_features: int, out_features: int, order: int) -> None:
    in_shape, out_shape = get_tensorized_shape(in_features, out_features, order)
    assert get_tensorized_shape(out_features, in_features, order) == (out_shape, in_shape)


@settings(deadline=None, max_examples=200)
@given(
    in_features=st.integers(min_value=1, max_value=10**7),
    out_features=st.integers(min_value=1, max_value=10**7),
    order=st.none() | st.integers(min_value=1, max_value=8),
    min_dim=st.integers(min_value=1, max_value=8),
)
def test_shape_properties_large_sizes(
    in_features: int, out_features: int, order: int | None, min_dim: int
) -> None:
    in_shape, out_shape = get_tensorized_shape(in_features, out_features, order, min_dim)
    d = len(in_shape)
    assert len(out_shape) == d <= (DEFAULT_ORDER if order is None else order)
    assert math.prod(in_shape) == in_features and math.prod(out_shape) == out_features
    assert all(type(f) is int for f in in_shape + out_shape)
    if d > 1:
        assert min(in_shape + out_shape) >= min_dim
        assert in_shape == tensorize_dim(in_features, d, min_dim)
        assert out_shape == tensorize_dim(out_features, d, min_dim)


@settings(deadline=None, max_examples=200)
@given(
    n=small_sizes,
    order=st.integers(min_value=1, max_value=8),
    min_dim=st.integers(min_value=1, max_value=5),
)
def test_tensorize_dim_matches_reference(n: int, order: int, min_dim: int) -> None:
    expected = _reference(n, order, min_dim)
    if expected is None:
        with pytest.raises(ValueError, match=f"n={n} cannot be written"):
            tensorize_dim(n, order, min_dim)
    else:
        assert tensorize_dim(n, order, min_dim) == expected
