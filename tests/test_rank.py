"""Tests for factlin.rank: validation, closed-form counts, caps and parameter-count targets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import tensorized_shapes

from factlin.errors import RankError
from factlin.rank import (
    count_cp_params,
    count_tt_params,
    count_tucker_params,
    max_cp_rank,
    max_tt_ranks,
    max_tucker_ranks,
    resolve_cp_rank,
    resolve_tt_ranks,
    resolve_tucker_ranks,
    validate_rank,
)


def _pairs(out_shape, in_shape):
    d = max(len(out_shape), len(in_shape))
    outs = tuple(out_shape) + (1,) * (d - len(out_shape))
    ins = tuple(in_shape) + (1,) * (d - len(in_shape))
    return [o * i for o, i in zip(outs, ins)]


def _resolved_count(factorization, rank, out_shape, in_shape):
    shape = tuple(out_shape) + tuple(in_shape)
    if factorization == "cp":
        r = resolve_cp_rank(rank, shape)
        return (
            count_cp_params(shape, r),
            count_cp_params(shape, max_cp_rank(shape)),
            count_cp_params(shape, 1),
        )
    if factorization == "tucker":
        r = resolve_tucker_ranks(rank, shape)
        ones = (1,) * len(shape)
        return (
            count_tucker_params(shape, r),
            count_tucker_params(shape, max_tucker_ranks(shape)),
            count_tucker_params(shape, ones),
        )
    pairs = _pairs(out_shape, in_shape)
    r = resolve_tt_ranks(rank, pairs)
    ones = (1,) * (len(pairs) + 1)
    return (
        count_tt_params(pairs, r),
        count_tt_params(pairs, max_tt_ranks(pairs)),
        count_tt_params(pairs, ones),
    )


# ---- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rank, error, message",
    [
        (0, RankError, "must be >= 1"),
        (-3, RankError, "must be >= 1"),
        (0.0, RankError, "finite and > 0"),
        (-0.5, RankError, "finite and > 0"),
        (float("nan"), RankError, "finite and > 0"),
        (float("inf"), RankError, "finite and > 0"),
        ("half", RankError, "not a known rank name"),
        ((), RankError, "must not be empty"),
        ((2, 0), RankError, "must be >= 1"),
        ((2, 1.5), TypeError, "must be an int"),
        (None, TypeError, "expected 'same'"),
        (True, TypeError, "not a bool"),
        ({"a": 1}, TypeError, "expected 'same'"),
    ],
)
def test_validate_rank_rejects(rank, error, message):
    with pytest.raises(error, match=message):
        validate_rank(rank)


@pytest.mark.parametrize(
    "rank, expected", [("SAME", "same"), (" same ", "same"), (3, 3), (0.5, 0.5), ([2, 3], (2, 3))]
)
def test_validate_rank_normalizes(rank, expected):
    assert validate_rank(rank) == expected


def test_rank_errors_are_value_errors():
    assert issubclass(RankError, ValueError)


def test_wrong_tuple_lengths():
    with pytest.raises(RankError, match="one rank per mode.*length 4, got length 2"):
        resolve_tucker_ranks((2, 2), (2, 3, 4, 5))
    with pytest.raises(RankError, match="needs 2 bond ranks for 3 cores"):
        resolve_tt_ranks((2, 2, 2), [4, 4, 4])
    with pytest.raises(RankError, match="start and end with 1"):
        resolve_tt_ranks((2, 2, 2, 2), [4, 4, 4])
    with pytest.raises(RankError, match="single rank"):
        resolve_cp_rank((2, 2), (4, 4))


# ---- closed forms and caps -------------------------------------------------------------------
def test_counts_by_hand():
    assert count_cp_params((2, 3, 4), 5) == 5 * (1 + 9)
    assert count_tucker_params((2, 3, 4), (1, 2, 3)) == 6 + 2 + 6 + 12
    assert count_tt_params([6, 20], (1, 3, 1)) == 18 + 60


def test_caps_by_hand():
    assert max_cp_rank((4, 5, 6)) == 20
    assert max_tucker_ranks((2, 30)) == (2, 2)
    assert max_tt_ranks([4, 4, 4]) == (1, 4, 4, 1)
    assert max_tt_ranks([64, 64, 144]) == (1, 64, 144, 1)


def test_tt_tuple_with_or_without_boundaries():
    assert resolve_tt_ranks((3, 4), [16, 16, 16]) == resolve_tt_ranks((1, 3, 4, 1), [16, 16, 16])


def test_int_ranks_capped():
    assert resolve_cp_rank(10**9, (4, 4)) == 4
    assert resolve_tucker_ranks(100, (2, 3, 4)) == (2, 3, 4)
    assert resolve_tt_ranks(10**6, [4, 9, 4]) == (1, 4, 4, 1)
    # a bond can never exceed what its neighbours let through
    assert resolve_tt_ranks((1, 16, 1), [4, 4, 4, 4]) == (1, 1, 4, 1, 1)


# ---- targets ---------------------------------------------------------------------------------
REAL_LAYERS = [
    ((8, 8, 12), (8, 8, 12)),
    ((8, 8, 12), (8, 16, 24)),
    ((32, 32), (32, 32)),
    ((8, 8, 16), (8, 8, 16)),
    ((16, 16, 16), (16, 16, 16)),
    ((10, 10), (4, 5, 5)),
]


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("shapes", REAL_LAYERS)
@pytest.mark.parametrize("rank", ["same", 1.5, 0.5, 0.25, 0.1, 0.05, 0.02])
def test_targets_met_on_real_layers(factorization, shapes, rank):
    in_shape, out_shape = shapes
    dense = math.prod(in_shape) * math.prod(out_shape)
    target = dense * (1.0 if rank == "same" else rank)
    count, full, ones = _resolved_count(factorization, rank, out_shape, in_shape)
    if target >= full:
        assert count == full
    elif target <= ones:
        assert count == ones
    else:
        assert abs(count - target) <= 0.15 * target, (count, target)


@given(
    in_shape=tensorized_shapes(1, 4, 16),
    out_shape=tensorized_shapes(1, 4, 16),
    fraction=st.floats(0.001, 3.0),
    factorization=st.sampled_from(["cp", "tucker", "tt"]),
)
def test_target_property(in_shape, out_shape, fraction, factorization):
    """Exact representation above it, all-ones below it, within 15% in between (when a single
    rank step is small enough relative to the target to allow it)."""
    dense = math.prod(in_shape) * math.prod(out_shape)
    target = fraction * dense
    count, full, ones = _resolved_count(factorization, fraction, out_shape, in_shape)
    assert ones <= count <= full
    if target >= full:
        assert count == full
    elif target <= ones:
        assert count == ones
    elif target >= 50 * ones:
        assert abs(count - target) <= 0.15 * target, (count, target)


@given(shape=tensorized_shapes(1, 6, 9), rank=st.integers(1, 50))
def test_tucker_caps_property(shape, rank):
    ranks = resolve_tucker_ranks(rank, shape)
    total = math.prod(ranks)
    for n, r in zip(shape, ranks):
        assert 1 <= r <= n
        assert r <= total // r  # r_k <= product of the other ranks


@given(pairs=st.lists(st.integers(1, 30), min_size=1, max_size=6), rank=st.integers(1, 100))
def test_tt_caps_property(pairs, rank):
    ranks = resolve_tt_ranks(rank, pairs)
    caps = max_tt_ranks(pairs)
    assert ranks[0] == ranks[-1] == 1 and len(ranks) == len(pairs) + 1
    for k in range(1, len(pairs)):
        assert 1 <= ranks[k] <= caps[k]
        assert ranks[k] <= ranks[k - 1] * pairs[k - 1]
        assert ranks[k] <= ranks[k + 1] * pairs[k]


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_count_non_decreasing_in_fraction(factorization):
    counts = [
        _resolved_count(factorization, f, (8, 8, 12), (8, 8, 12))[0]
        for f in (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    ]
    assert counts == sorted(counts)
