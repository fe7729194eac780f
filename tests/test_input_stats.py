"""Tests for factlin/input_stats.py: InputStats, PairedInputStats, damped."""

from __future__ import annotations

import math

import pytest
import torch
from _close import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import input_batches

from factlin.input_stats import DEFAULT_DAMPING, InputStats, PairedInputStats, damped


def _reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, second moment and covariance of ``rows`` ``(n, in)`` in float64."""
    x = rows.double()
    n = x.shape[0]
    if n == 0:  # empty statistics are zeros
        zeros = torch.zeros(x.shape[1], dtype=torch.float64)
        return zeros, torch.outer(zeros, zeros), torch.outer(zeros, zeros)
    mean = x.mean(0)
    second = x.T @ x / n
    centered = x - mean
    return mean, second, centered.T @ centered / n


def _assert_matches(stats: InputStats, rows: torch.Tensor) -> None:
    mean, second, cov = _reference(rows)
    assert stats.count == rows.shape[0]
    assert stats.mean.dtype == stats.second_moment.dtype == torch.float64
    assert_close(stats.mean, mean, rtol=1e-12, atol=1e-12)
    assert_close(stats.second_moment, second, rtol=1e-12, atol=1e-12)
    assert_close(stats.covariance, cov, rtol=1e-10, atol=1e-11)
    assert_close(stats.moment(False), second, rtol=1e-12, atol=1e-12)
    assert_close(stats.moment(True), cov, rtol=1e-10, atol=1e-11)
    assert_close(stats.covariance, stats.covariance.T, rtol=0, atol=0)


# ---- streaming, merge, shapes -----------------------------------------------------------------
@given(input_batches())
def test_streaming_equals_one_shot(batches):
    in_features = batches[0].shape[-1]
    stats = InputStats(in_features)
    for batch in batches:
        stats.update(batch)
    rows = torch.cat([b.reshape(-1, in_features) for b in batches])
    _assert_matches(stats, rows)
    one_shot = InputStats.from_inputs(rows)
    assert_close(one_shot.sum_outer, stats.sum_outer, rtol=1e-12, atol=1e-10)


@given(input_batches(min_batches=2))
def test_merge_equals_stats_of_concatenation(batches):
    in_features = batches[0].shape[-1]
    parts = [InputStats.from_inputs(b) for b in batches]
    before = [(p.count, p.sum.clone(), p.sum_outer.clone()) for p in parts]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    _assert_matches(merged, torch.cat([b.reshape(-1, in_features) for b in batches]))
    for part, (count, total, outer) in zip(parts, before):  # neither operand is modified
        assert part.count == count
        assert torch.equal(part.sum, total) and torch.equal(part.sum_outer, outer)
    added = parts[0] + parts[1]
    assert added.count == parts[0].count + parts[1].count


def test_any_leading_shape_counts_every_row():
    stats = InputStats(4)
    x3 = torch.randn(2, 3, 5, 4)
    stats.update(x3)
    assert stats.count == 30
    stats.update(torch.randn(4))  # one row
    assert stats.count == 31
    stats.update(torch.randn(0, 4))  # no rows: nothing changes
    assert stats.count == 31
    _assert_matches(InputStats.from_inputs(x3), x3.reshape(-1, 4))


def test_float16_and_bfloat16_inputs_accumulate_in_float64():
    x = torch.randn(50, 6)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        stats = InputStats.from_inputs(low)
        _assert_matches(stats, low.double())


def test_empty_stats_are_zero():
    stats = InputStats(3)
    assert stats.count == 0
    assert torch.equal(stats.mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(stats.second_moment, torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(stats.covariance, torch.zeros(3, 3, dtype=torch.float64))
    assert repr(stats) == "InputStats(in_features=3, count=0)"


def test_to_copies():
    stats = InputStats.from_inputs(torch.randn(10, 3))
    copy = stats.to("cpu")
    assert copy is not stats and copy.count == stats.count
    assert_close(copy.sum_outer, stats.sum_outer, rtol=0, atol=0)
    copy.update(torch.randn(2, 3))
    assert stats.count == 10


# ---- damping ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [0, 1, 3, 40])
def test_damping_makes_rank_deficient_moments_positive_definite(rows):
    stats = InputStats(12)
    if rows:
        stats.update(torch.randn(rows, 12) * 1e3)
    for centered in (False, True):
        moment = stats.moment(centered)
        assert torch.linalg.matrix_rank(moment) <= max(rows - centered, 0) or rows == 40
        for damping in (DEFAULT_DAMPING, 1e-8):
            lower, info = torch.linalg.cholesky_ex(damped(moment, damping))
            assert int(info) == 0 and torch.isfinite(lower).all()


def test_damped_adds_a_relative_multiple_of_the_identity():
    moment = torch.diag(torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64))
    expected = moment + 0.1 * 2.0 * torch.eye(3, dtype=torch.float64)  # mean diag = 2
    assert_close(damped(moment, 0.1), expected, rtol=0, atol=1e-15)
    zero = torch.zeros(3, 3, dtype=torch.float64)
    assert_close(damped(zero, 0.5), 0.5 * torch.eye(3, dtype=torch.float64), rtol=0, atol=0)
    assert_close(damped(moment, 0.0), moment, rtol=0, atol=0)
    batched = damped(torch.stack([moment, 2 * moment]), 0.1)  # (..., n, n)
    assert_close(batched[1], 2 * expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("damping", [-1.0, math.nan, math.inf])
def test_damped_rejects_bad_damping(damping):
    with pytest.raises(ValueError, match="damping"):
        damped(torch.eye(2), damping)
    with pytest.raises(TypeError, match="damping"):
        damped(torch.eye(2), "0.1")


# ---- bad input --------------------------------------------------------------------------------
def test_wrong_last_dimension_names_both_sizes():
    stats = InputStats(5)
    with pytest.raises(ValueError, match=r"\(3, 4\).*5"):
        stats.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="5"):
        stats.update(torch.tensor(1.0))
    assert stats.count == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_rejected_before_any_change(bad):
    stats = InputStats.from_inputs(torch.randn(4, 3))
    count, outer = stats.count, stats.sum_outer.clone()
    x = torch.randn(5, 3)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.update(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        InputStats.from_inputs(x)
    assert stats.count == count and torch.equal(stats.sum_outer, outer)


@pytest.mark.parametrize(
    "x", [torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2, dtype=torch.bool), [[1.0, 2.0]]]
)
def test_non_float_inputs_are_type_errors(x):
    with pytest.raises(TypeError):
        InputStats(2).update(x)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4", None])
def test_bad_in_features(bad):
    with pytest.raises(TypeError, match="in_features"):
        InputStats(bad)


def test_from_inputs_rejects_non_tensors_and_scalars():
    with pytest.raises(TypeError, match="calibration"):
        InputStats.from_inputs([[1.0, 2.0]])
    with pytest.raises(TypeError):
        InputStats.from_inputs(torch.tensor(1.0))


def test_merge_of_different_sizes_or_types():
    with pytest.raises(ValueError, match=r"3 features.*4 features"):
        InputStats(4).merge(InputStats(3))
    with pytest.raises(TypeError, match="InputStats"):
        InputStats(4).merge(torch.zeros(4))


# ---- paired statistics ------------------------------------------------------------------------
def test_paired_stats_match_references():
    x = torch.randn(3, 20, 6, dtype=torch.float64)
    x_c = x + 0.1 * torch.randn_like(x) + 0.3
    paired = PairedInputStats(6)
    paired.update(x[:1], x_c[:1])
    paired.update(x[1:], x_c[1:])
    rows, rows_c = x.reshape(-1, 6), x_c.reshape(-1, 6)
    _assert_matches(paired.dense, rows)
    _assert_matches(paired.compressed, rows_c)
    assert paired.count == 60 and paired.in_features == 6
    assert_close(paired.cross_moment(False), rows.T @ rows_c / 60, rtol=1e-12, atol=0)
    centered = (rows - rows.mean(0)).T @ (rows_c - rows_c.mean(0)) / 60
    assert_close(paired.cross_moment(True), centered, rtol=1e-10, atol=1e-12)
    assert repr(paired) == "PairedInputStats(in_features=6, count=60)"


def test_paired_stats_reject_mismatched_shapes():
    paired = PairedInputStats(4)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        paired.update(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="4"):
        paired.update(torch.randn(3, 5), torch.randn(3, 5))
    assert paired.count == 0


@settings(max_examples=10)
@given(st.integers(1, 6), st.integers(0, 30))
def test_paired_stats_of_identical_inputs_equal_plain_stats(features, rows):
    x = torch.randn(rows, features)
    paired = PairedInputStats(features)
    paired.update(x, x)
    plain = InputStats.from_inputs(x) if rows else InputStats(features)
    assert_close(paired.cross_moment(False), plain.second_moment, rtol=0, atol=0)
    assert_close(paired.cross_moment(True), plain.covariance, rtol=1e-10, atol=1e-12)


def test_pickle_round_trip():
    import pickle

    stats = InputStats.from_inputs(torch.randn(7, 3))
    back = pickle.loads(pickle.dumps(stats))
    assert back.count == 7 and back.in_features == 3
    assert torch.equal(back.sum_outer, stats.sum_outer) and torch.equal(back.sum, stats.sum)
    merged = back.merge(stats)  # e.g. statistics gathered in other processes
    assert merged.count == 14
