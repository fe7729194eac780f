"""Tests for factlin.decompositions.tt_svd: reference, exactness, tolerance bound, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factlin.decompositions import TTDecomposition, tt_matrix_svd, tt_matrix_to_tensor

F64 = torch.float64


def gaussian(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def full_ranks(out_shape, in_shape):
    sizes = [o * i for o, i in zip(out_shape, in_shape)]
    total = math.prod(sizes)
    return (
        1,
        *(min(math.prod(sizes[:k]), total // math.prod(sizes[:k])) for k in range(1, len(sizes))),
        1,
    )


# ---------------------------------------------------------------------------------- reference
def test_tt_matrix_to_tensor_matches_einsum():
    cores = [gaussian((1, 2, 3, 4), 0), gaussian((4, 3, 2, 5), 1), gaussian((5, 2, 2, 1), 2)]
    expected = torch.einsum("aipb,bjqc,ckrd->ijkpqr", *cores)
    torch.testing.assert_close(tt_matrix_to_tensor(cores), expected, rtol=1e-13, atol=1e-13)


def test_two_cores_are_the_truncated_svd_of_the_reshuffled_matrix():
    w = gaussian((3, 4, 5, 2), 3)  # out (3, 4), in (5, 2)
    tt = tt_matrix_svd(w, (3, 4), (5, 2), (1, 4, 1))
    reshuffled = w.permute(0, 2, 1, 3).reshape(15, 8)  # (o1 i1, o2 i2)
    s = torch.linalg.svdvals(reshuffled)
    assert tt.rel_error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-10)


# ------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    ("out_shape", "in_shape"), [((8, 8, 12), (8, 8, 12)), ((2, 3), (4, 1)), ((5,), (7,))]
)
def test_exact_at_full_ranks(out_shape, in_shape, dtype, tol):
    w = gaussian((*out_shape, *in_shape), 4, dtype)
    for tt in (
        tt_matrix_svd(w, out_shape, in_shape, full_ranks(out_shape, in_shape)),
        tt_matrix_svd(w, out_shape, in_shape, rel_tol=0.0),
    ):
        assert isinstance(tt, TTDecomposition)
        assert tt.ranks == full_ranks(out_shape, in_shape)
        assert tt.rel_error < tol
        assert rel(tt.to_tensor().double(), w.double()) < tol


def test_core_shapes_follow_ranks():
    w = gaussian((2, 3, 4, 5, 6, 7), 5)
    tt = tt_matrix_svd(w, (2, 3, 4), (5, 6, 7), (1, 6, 9, 1))
    assert [tuple(c.shape) for c in tt.cores] == [(1, 2, 5, 6), (6, 3, 6, 9), (9, 4, 7, 1)]
    assert tt.ranks == (1, 6, 9, 1)


def test_bond_larger_than_available_gets_zero_slices():
    # step 2 has only r_1 * o_2 * i_2 = 1 * 2 = 2 rows, fewer than the asked r_2 = 8
    w = gaussian((4, 2, 8, 1, 1, 1), 6)
    tt = tt_matrix_svd(w, (4, 2, 8), (1, 1, 1), (1, 1, 8, 1))
    assert [tuple(c.shape) for c in tt.cores] == [(1, 4, 1, 1), (1, 2, 1, 8), (8, 8, 1, 1)]
    assert torch.all(tt.cores[2][2:] == 0)
    assert tt.rel_error == pytest.approx(rel(tt.to_tensor(), w), rel=1e-10)


# -------------------------------------------------------------------------------- properties
@st.composite
def tt_shapes(draw):
    d = draw(st.integers(1, 3))
    out_shape = tuple(draw(st.integers(1, 4)) for _ in range(d))
    in_shape = tuple(draw(st.integers(1, 4)) for _ in range(d))
    return out_shape, in_shape


@settings(max_examples=40, deadline=None)
@given(shapes=tt_shapes(), eps=st.floats(0.0, 0.95), seed=st.integers(0, 1000))
def test_tolerance_bound(shapes, eps, seed):
    out_shape, in_shape = shapes
    w = gaussian((*out_shape, *in_shape), seed)
    tt = tt_matrix_svd(w, out_shape, in_shape, rel_tol=eps)
    error = float(torch.linalg.vector_norm(tt.to_tensor() - w))
    assert error <= eps * float(torch.linalg.vector_norm(w)) + 1e-12
    assert tt.rel_error == pytest.approx(rel(tt.to_tensor(), w), rel=1e-8, abs=1e-12)
    assert all(r <= f for r, f in zip(tt.ranks, full_ranks(out_shape, in_shape)))


@settings(max_examples=30, deadline=None)
@given(shapes=tt_shapes(), rank=st.integers(1, 8), seed=st.integers(0, 1000))
def test_error_non_increasing_in_rank(shapes, rank, seed):
    out_shape, in_shape = shapes
    w = gaussian((*out_shape, *in_shape), seed)
    full = full_ranks(out_shape, in_shape)
    small = tuple(min(rank, f) for f in full)
    big = tuple(min(rank + 1, f) for f in full)
    e_small = tt_matrix_svd(w, out_shape, in_shape, small).rel_error
    e_big = tt_matrix_svd(w, out_shape, in_shape, big).rel_error
    assert e_big <= e_small + 1e-12


def test_ranks_cap_the_tolerance():
    w = gaussian((4, 4, 4, 4), 7)
    tt = tt_matrix_svd(w, (4, 4), (4, 4), (1, 3, 1), rel_tol=1e-6)
    assert tt.ranks == (1, 3, 1)
    loose = tt_matrix_svd(w, (4, 4), (4, 4), (1, 16, 1), rel_tol=0.99)
    assert loose.ranks[1] < 16


@pytest.mark.parametrize(
    "w",
    [torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 4, 5), torch.ones(2, 3, 4, 5) * 1e-30],
    ids=["zero", "constant", "tiny"],
)
@pytest.mark.parametrize("rank_kwargs", [{"ranks": (1, 4, 1)}, {"rel_tol": 0.1}])
def test_degenerate_inputs_give_no_nan(w, rank_kwargs):
    tt = tt_matrix_svd(w, (2, 3), (4, 5), **rank_kwargs)
    assert all(torch.isfinite(c).all() for c in tt.cores)
    assert math.isfinite(tt.rel_error) and tt.rel_error < 1e-5


def test_rank_deficient_input_is_exact_at_its_rank():
    a, b = gaussian((2, 4, 1), 8), gaussian((1, 3, 5), 9)  # one bond of rank 1
    w = torch.einsum("aib,bjc->aibjc", a, b).reshape(2, 4, 3, 5).permute(0, 2, 1, 3)
    tt = tt_matrix_svd(w, (2, 3), (4, 5), rel_tol=1e-6)
    assert tt.ranks == (1, 1, 1) and tt.rel_error < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    tt = tt_matrix_svd(gaussian((2, 3, 4, 5), 10).to(dtype), (2, 3), (4, 5), (1, 3, 1))
    assert all(c.dtype == dtype for c in tt.cores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_preserved():
    tt = tt_matrix_svd(gaussian((2, 3, 4, 5), 10).cuda(), (2, 3), (4, 5), rel_tol=0.0)
    assert tt.cores[0].is_cuda and tt.rel_error < 1e-12


# -------------------------------------------------------------------------------- bad inputs
W = torch.ones(2, 3, 4, 5)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (((2, 3), (4, 5)), {}, ValueError, r"needs ranks=.*rel_tol"),
        (((2, 3), (4, 5), (1, 2)), {}, ValueError, r"has 2 entries: expected 3"),
        (((2, 3), (4, 5), (2, 2, 1)), {}, ValueError, r"boundary ranks r_0 = r_d = 1"),
        (((2, 3), (4, 5), (1, 0, 1)), {}, ValueError, r"every entry must be >= 1"),
        (((2, 3), (4, 5)), {"rel_tol": -0.1}, ValueError, r"rel_tol=-0\.1"),
        (((2, 3), (4, 5)), {"rel_tol": "a"}, TypeError, r"rel_tol='a'"),
        (((2, 3, 1), (4, 5)), {"rel_tol": 0.1}, ValueError, r"have 3 and 2 modes"),
        (((3, 2), (4, 5)), {"rel_tol": 0.1}, ValueError, r"expected \(\*out_shape, \*in_shape\)"),
        (((), ()), {"rel_tol": 0.1}, ValueError, r"out_shape=\(\): expected a non-empty"),
        (((2, 3), 20), {"rel_tol": 0.1}, TypeError, r"in_shape=20"),
    ],
)
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tt_matrix_svd(W, *args, **kwargs)


def test_nan_input_rejected():
    w = W.clone()
    w[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/inf"):
        tt_matrix_svd(w, (2, 3), (4, 5), rel_tol=0.1)


# ------------------------------------------------------- float32 route (mixed-precision Grams)
def spectrum_weight(kind, seed, out=256, inn=384):
    """A float32 weight with a flat (Gaussian), 1/k or 0.9^k singular spectrum."""
    w = gaussian((out, inn), seed)
    if kind != "flat":
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        k = torch.arange(1, u.shape[1] + 1, dtype=F64)
        w = (u * (1.0 / k if kind == "decay" else 0.9**k)) @ vh
    return w.float()


@pytest.mark.parametrize("kind", ["flat", "decay", "exp"])
@pytest.mark.parametrize("rank", [8, 64, 200])
def test_float32_route_matches_the_float64_one(kind, rank):
    # float32 Gram blocks summed in float64: the documented accuracy is the float64 route's
    # error to within 1e-6 (measured: 1e-8), and a reported error true to 1e-6
    t = spectrum_weight(kind, rank).reshape(16, 16, 16, 24)
    fast = tt_matrix_svd(t, (16, 16), (16, 24), (1, rank, 1))
    ref = tt_matrix_svd(t.double(), (16, 16), (16, 24), (1, rank, 1))
    assert fast.rel_error == pytest.approx(ref.rel_error, abs=1e-6)
    assert fast.rel_error == pytest.approx(rel(fast.to_tensor().double(), t.double()), abs=1e-6)


@pytest.mark.parametrize("cond", [10.0, 1e3])
def test_float32_near_exact_fit_keeps_float64_accuracy(cond):
    # a truncation that discards almost nothing recomputes its Gram in float64
    g = torch.Generator().manual_seed(7)
    scale = torch.logspace(0, -math.log10(cond), 8, dtype=F64)
    cores = [
        torch.randn(1, 16, 16, 8, generator=g, dtype=F64) * scale,
        torch.randn(8, 16, 24, 1, generator=g, dtype=F64),
    ]
    t = tt_matrix_to_tensor(cores).float()
    tt = tt_matrix_svd(t, (16, 16), (16, 24), (1, 8, 1))
    assert tt.rel_error < 1e-6 and rel(tt.to_tensor().double(), t.double()) < 1e-6


def test_three_cores_float32_error_from_the_norms_is_exact():
    # the error comes from ||W||^2 - ||W_hat||^2 (orthonormal left cores, right projection)
    w = spectrum_weight("decay", 3, 64, 96).reshape(4, 4, 4, 4, 4, 6)
    tt = tt_matrix_svd(w, (4, 4, 4), (4, 4, 6), (1, 9, 20, 1))
    assert tt.rel_error == pytest.approx(rel(tt.to_tensor().double(), w.double()), abs=1e-6)
    first = tt.cores[0].reshape(-1, 9).double()
    torch.testing.assert_close(first.T @ first, torch.eye(9, dtype=F64), atol=1e-6, rtol=0)
