"""Tests for the decomposition helpers of factlin.decompositions._linalg added for large weights:
mode products and Grams without unfolding copies, right singular vectors, the float32 route."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factlin.decompositions._linalg import (
    left_singular_vectors,
    mixed_precision_ok,
    mode_gram,
    mode_left_singular_vectors,
    mode_multiply,
    mode_product,
    right_singular_vectors,
    sq_norm,
    unfold,
)

F64 = torch.float64


def gaussian(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


shape_and_mode = st.lists(st.integers(1, 5), min_size=1, max_size=5).flatmap(
    lambda shape: st.tuples(st.just(tuple(shape)), st.integers(0, len(shape) - 1))
)


@settings(max_examples=40, deadline=None)
@given(case=shape_and_mode, rows=st.integers(1, 6), seed=st.integers(0, 100))
def test_mode_multiply_is_mode_product(case, rows, seed):
    shape, mode = case
    x, matrix = gaussian(shape, seed), gaussian((rows, shape[mode]), seed + 1)
    out = mode_multiply(x, matrix, mode)
    assert out.is_contiguous()
    torch.testing.assert_close(out, mode_product(x, matrix, mode), rtol=1e-12, atol=1e-12)


def test_mode_multiply_accepts_a_non_contiguous_tensor():
    x = gaussian((5, 4, 3), 1).permute(2, 0, 1)  # (3, 5, 4), not contiguous
    matrix = gaussian((2, 5), 2)
    torch.testing.assert_close(mode_multiply(x, matrix, 1), mode_product(x, matrix, 1))


@settings(max_examples=40, deadline=None)
@given(case=shape_and_mode, seed=st.integers(0, 100))
def test_mode_gram_is_the_unfolding_gram(case, seed):
    shape, mode = case
    x = gaussian(shape, seed)
    u = unfold(x, mode)
    torch.testing.assert_close(mode_gram(x, mode), u @ u.T, rtol=1e-12, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(mode_gram(x32, mode, mixed=True), u @ u.T, rtol=1e-5, atol=1e-5)


def test_mode_gram_in_several_blocks(monkeypatch):
    import factlin.decompositions._linalg as linalg

    x = gaussian((7, 6, 5, 4), 3)
    u = unfold(x, 2)
    monkeypatch.setattr(linalg, "MIXED_GRAM_BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(linalg, "GRAM_BLOCK_ELEMENTS", 40)
    torch.testing.assert_close(mode_gram(x, 2), u @ u.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mode_gram(x.float(), 2, mixed=True), u @ u.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize(("shape", "mode", "rank"), [((6, 7, 8), 1, 3), ((40, 2, 3), 0, 5)])
def test_mode_left_singular_vectors_span_the_leading_subspace(shape, mode, rank, mixed):
    # (40, 2, 3) mode 0 is longer than the rest: the unfolding path is taken
    x = gaussian(shape, 4)
    if mixed:
        x = x.float()
    u = mode_left_singular_vectors(x, mode, rank, mixed=mixed)
    ref = torch.linalg.svd(unfold(x.double(), mode), full_matrices=False)[0][:, :rank]
    tol = 1e-5 if mixed else 1e-10
    torch.testing.assert_close((u @ u.T).double(), ref @ ref.T, atol=tol, rtol=0)


def test_right_singular_vectors_give_the_truncated_svd():
    m = gaussian((30, 8), 5)
    v, s2 = right_singular_vectors(m, 3)
    u_ref, s_ref, vh_ref = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(s2, s_ref.square(), rtol=1e-10, atol=1e-10)
    best = (u_ref[:, :3] * s_ref[:3]) @ vh_ref[:3]
    torch.testing.assert_close(m @ v @ v.T, best, rtol=1e-10, atol=1e-10)
    v_tol, _ = right_singular_vectors(m, 8, tail_energy=float(s_ref[3:].square().sum()) * 1.01)
    assert v_tol.shape == (8, 3)


def test_mixed_left_vectors_match_float64_ones_on_a_flat_spectrum():
    m = gaussian((64, 500), 6, dtype=torch.float32)
    fast, _ = left_singular_vectors(m, 20, mixed=True)
    ref, _ = left_singular_vectors(m.double(), 20)
    torch.testing.assert_close((fast @ fast.T).double(), ref @ ref.T, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (torch.randn(10, 10), True),
        (torch.randn(10, 10, dtype=F64), False),  # float64 keeps the float64 route
        (torch.randn(10, 10) * 1e-30, False),  # squares would underflow
        (torch.randn(10, 10) * 1e20, False),  # squares would overflow
        (torch.zeros(10, 10), False),
    ],
)
def test_mixed_precision_ok(tensor, expected):
    assert mixed_precision_ok(tensor, sq_norm(tensor)) is expected
