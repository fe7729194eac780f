"""Tests for factlin.decompositions.tucker: reference, exact recovery, properties, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factlin.decompositions import TuckerDecomposition, hosvd, tucker, tucker_to_tensor

F64 = torch.float64


def gaussian(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def orthonormal(n, r, seed):
    return torch.linalg.qr(gaussian((n, r), seed))[0]


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ---------------------------------------------------------------------------------- reference
def test_tucker_to_tensor_matches_einsum():
    core = gaussian((2, 3, 4), 0)
    factors = [gaussian((n, r), k) for k, (n, r) in enumerate([(5, 2), (4, 3), (6, 4)])]
    expected = torch.einsum("abc,ia,jb,kc->ijk", core, *factors)
    torch.testing.assert_close(tucker_to_tensor(core, factors), expected, rtol=1e-13, atol=1e-13)


def test_hosvd_matches_matrix_svd_on_a_matrix():
    x = gaussian((7, 9), 1)
    t = hosvd(x, (3, 3))
    u, s, vh = torch.linalg.svd(x)
    best = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
    assert t.rel_error == pytest.approx(best, rel=1e-10)
    torch.testing.assert_close(t.to_tensor(), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- exact recovery
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(4, 5, 6), (8, 8, 12, 8, 8, 12), (3, 1, 4), (7,)])
def test_exact_at_full_ranks(shape, dtype, tol):
    x = gaussian(shape, 2, dtype)
    for result in (hosvd(x, shape), tucker(x, shape)):
        assert result.rel_error < tol
        assert rel(result.to_tensor().double(), x.double()) < tol


def test_recovers_low_multilinear_rank_tensor():
    ranks, shape = (2, 3, 2, 3), (5, 6, 4, 7)
    core = gaussian(ranks, 3)
    x = tucker_to_tensor(
        core, [orthonormal(n, r, 10 + k) for k, (n, r) in enumerate(zip(shape, ranks))]
    )
    result = tucker(x, ranks)
    assert isinstance(result, TuckerDecomposition)
    assert result.core.shape == ranks and result.rel_error < 1e-12


# -------------------------------------------------------------------------------- properties
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@st.composite
def shape_and_ranks(draw):
    shape = draw(shapes)
    ranks = tuple(draw(st.integers(1, n)) for n in shape)
    return shape, ranks


@settings(max_examples=30, deadline=None)
@given(case=shape_and_ranks(), seed=st.integers(0, 1000))
def test_factors_orthonormal_and_error_consistent(case, seed):
    shape, ranks = case
    x = gaussian(shape, seed)
    result = tucker(x, ranks, n_iter_max=3)
    assert result.core.shape == ranks
    for f, n, r in zip(result.factors, shape, ranks):
        assert f.shape == (n, r)
        torch.testing.assert_close(f.T @ f, torch.eye(r, dtype=F64), rtol=0, atol=1e-10)
    assert result.rel_error == pytest.approx(rel(result.to_tensor(), x), rel=1e-8, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(case=shape_and_ranks(), seed=st.integers(0, 1000), data=st.data())
def test_hosvd_error_non_increasing_in_rank(case, seed, data):
    shape, ranks = case
    grow = [k for k, (n, r) in enumerate(zip(shape, ranks)) if r < n]
    if not grow:
        return
    mode = data.draw(st.sampled_from(grow))
    bigger = tuple(r + (k == mode) for k, r in enumerate(ranks))
    x = gaussian(shape, seed)
    assert hosvd(x, bigger).rel_error <= hosvd(x, ranks).rel_error + 1e-12


@settings(max_examples=20, deadline=None)
@given(case=shape_and_ranks(), seed=st.integers(0, 1000))
def test_hooi_never_worse_than_hosvd(case, seed):
    shape, ranks = case
    x = gaussian(shape, seed)
    assert tucker(x, ranks).rel_error <= hosvd(x, ranks).rel_error + 1e-12


def test_n_iter_max_zero_is_hosvd_and_callback_counts_sweeps():
    x = gaussian((5, 6, 7), 4)
    h, t0 = hosvd(x, (2, 3, 4)), tucker(x, (2, 3, 4), n_iter_max=0)
    assert t0.n_iter == 0 and t0.rel_error == h.rel_error
    calls = []
    t = tucker(x, (2, 3, 4), n_iter_max=5, tol=0.0, callback=lambda it, e: calls.append(it))
    assert calls == list(range(1, t.n_iter + 1)) and t.n_iter == 5


def test_random_init_converges_close_to_svd_init():
    x = gaussian((6, 7, 8), 5)
    svd = tucker(x, (3, 3, 3), n_iter_max=50, tol=1e-8)
    rnd = tucker(x, (3, 3, 3), n_iter_max=50, tol=1e-8, init="random", random_state=1)
    assert rnd.rel_error == pytest.approx(svd.rel_error, rel=1e-3)


def test_randomized_svd_path_on_a_large_unfolding():
    # both sides of each unfolding > 1024 and rank small: the randomized range finder is used
    g = torch.Generator().manual_seed(6)
    low = torch.randn(1100, 5, generator=g, dtype=F64) @ torch.randn(
        5, 1100, generator=g, dtype=F64
    )
    x = low + 1e-3 * torch.randn(1100, 1100, generator=g, dtype=F64)
    s = torch.linalg.svdvals(x)
    best = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
    assert hosvd(x, (5, 5)).rel_error <= best * (1 + 1e-6)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(3, 4, 5),
        torch.ones(3, 4, 5),
        torch.ones(3, 4, 5) * 1e-30,
        torch.ones(3, 4, 5) * 1e30,
    ],
    ids=["zero", "constant", "tiny", "huge"],
)
def test_degenerate_inputs_give_no_nan(x):
    t = tucker(x, (2, 2, 2))
    assert all(torch.isfinite(a).all() for a in (t.core, *t.factors))
    assert math.isfinite(t.rel_error) and t.rel_error < 1e-5


def test_rank_deficient_input():
    x = tucker_to_tensor(
        gaussian((1, 2, 1), 7), [gaussian((n, r), 8 + n) for n, r in [(4, 1), (5, 2), (6, 1)]]
    )
    t = tucker(x, (3, 4, 5))
    assert all(torch.isfinite(a).all() for a in (t.core, *t.factors)) and t.rel_error < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    t = tucker(gaussian((4, 5, 6), 9).to(dtype), (2, 3, 3))
    assert t.core.dtype == dtype and all(f.dtype == dtype for f in t.factors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_preserved():
    t = tucker(gaussian((4, 5, 6), 9).cuda(), (4, 5, 6))
    assert t.core.is_cuda and t.rel_error < 1e-12


# -------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("ranks", "kwargs", "error", "match"),
    [
        ((2, 2), {}, ValueError, r"ranks=\(2, 2\) has 2 entries: expected 3"),
        ((2, 0, 2), {}, ValueError, r"every entry must be >= 1, got 0"),
        ((2, 2.0, 2), {}, TypeError, r"every entry must be a positive int"),
        ((2, 5, 2), {}, ValueError, r"ranks\[1\]=5 exceeds the mode size 4"),
        (3, {}, TypeError, r"ranks=3 .*expected a tuple of 3 positive ints"),
        ((2, 2, 2), {"init": "hosvd"}, ValueError, r"init='hosvd' is not known"),
        ((2, 2, 2), {"n_iter_max": -2}, ValueError, r"n_iter_max=-2"),
        ((2, 2, 2), {"tol": "x"}, TypeError, r"tol='x'"),
    ],
)
def test_bad_arguments(ranks, kwargs, error, match):
    with pytest.raises(error, match=match):
        tucker(torch.ones(3, 4, 5), ranks, **kwargs)


def test_nan_input_rejected():
    x = torch.ones(3, 4, 5)
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"tensor contains 1 NaN/inf value\(s\) out of 60"):
        hosvd(x, (2, 2, 2))


# ------------------------------------------------------------- HOOI on a dimension tree
def reference_hooi(x, ranks, sweeps):
    """Plain HOOI: for each mode in turn, project on every other mode, keep the leading left
    singular vectors of the unfolding (full SVD), float64."""
    factors = [
        torch.linalg.svd(x.movedim(k, 0).reshape(n, -1), full_matrices=False)[0][:, :r]
        for k, (n, r) in enumerate(zip(x.shape, ranks))
    ]
    for _ in range(sweeps):
        for mode in range(x.ndim):
            y = x
            for k in range(x.ndim):
                if k != mode:
                    y = torch.tensordot(factors[k].T, y, dims=([1], [k])).movedim(0, k)
            unfolded = y.movedim(mode, 0).reshape(x.shape[mode], -1)
            factors[mode] = torch.linalg.svd(unfolded, full_matrices=False)[0][:, : ranks[mode]]
    return factors


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [((6, 7, 8), (2, 3, 4)), ((4, 5, 3, 6, 2), (2, 2, 3, 3, 1)), ((5, 4, 6, 3, 4, 5), (3,) * 6)],
)
def test_dimension_tree_sweeps_are_plain_hooi(shape, ranks):
    x = gaussian(shape, 11)
    result = tucker(x, ranks, n_iter_max=3, tol=0.0)
    for ours, ref in zip(result.factors, reference_hooi(x, ranks, 3)):
        # same subspaces: the projections agree
        torch.testing.assert_close(ours @ ours.T, ref @ ref.T, atol=1e-8, rtol=0)


def test_default_tol_stops_when_the_fit_stops_improving():
    x = gaussian((8, 9, 10, 11), 12)
    errors = []
    result = tucker(x, (4, 4, 4, 4), n_iter_max=100, callback=lambda it, e: errors.append(e))
    assert result.n_iter == len(errors) < 100
    assert abs(errors[-2] - errors[-1]) <= 1e-4 * errors[-2]
    assert all(abs(a - b) > 1e-4 * a for a, b in zip(errors[:-2], errors[1:-1]))
    longer = tucker(x, (4, 4, 4, 4), n_iter_max=100, tol=1e-10)
    assert longer.rel_error <= result.rel_error <= longer.rel_error + 1e-3


# ------------------------------------------------------- float32 route (mixed-precision Grams)
@pytest.mark.parametrize("kind", ["flat", "decay", "exp"])
@pytest.mark.parametrize("ranks", [(4, 4, 4, 4), (12, 12, 12, 16)])
def test_float32_route_matches_the_float64_one(kind, ranks):
    # float32 Gram blocks summed in float64: the float64 route's error to within 1e-6
    # (measured: 1e-8) and a reported error true to 1e-6
    w = gaussian((256, 384), len(kind))
    if kind != "flat":
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        k = torch.arange(1, u.shape[1] + 1, dtype=F64)
        w = (u * (1.0 / k if kind == "decay" else 0.9**k)) @ vh
    x = w.float().reshape(16, 16, 16, 24)
    fast, ref = tucker(x, ranks), tucker(x.double(), ranks)
    assert fast.rel_error == pytest.approx(ref.rel_error, abs=1e-6)
    assert fast.rel_error == pytest.approx(rel(fast.to_tensor().double(), x.double()), abs=1e-6)


def test_float32_near_exact_fit_keeps_float64_accuracy():
    g = torch.Generator().manual_seed(13)
    core = torch.randn(4, 4, 4, 4, generator=g, dtype=F64)
    scale = torch.logspace(0, -0.75, 4, dtype=F64)
    factors = [orthonormal(n, 4, 20 + k) * scale for k, n in enumerate((16, 16, 16, 24))]
    x = tucker_to_tensor(core, factors).float()
    result = tucker(x, (4, 4, 4, 4))
    assert result.rel_error < 1e-6 and rel(result.to_tensor().double(), x.double()) < 1e-6
