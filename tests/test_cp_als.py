"""Tests for factlin.decompositions.cp_als: reference, exact recovery, properties, bad inputs."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factlin.decompositions import CPDecomposition, cp_als, cp_to_tensor

F64 = torch.float64


def random_factors(shape, rank, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, rank, generator=g, dtype=dtype) for n in shape]


def exact_cp(shape, rank, seed, dtype=F64):
    return cp_to_tensor(torch.ones(rank, dtype=dtype), random_factors(shape, rank, seed, dtype))


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ---------------------------------------------------------------------------------- reference
def test_cp_to_tensor_matches_einsum():
    weights = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    factors = random_factors((3, 4, 5, 2), 3, seed=0)
    expected = torch.einsum("r,ir,jr,kr,lr->ijkl", weights, *factors)
    torch.testing.assert_close(cp_to_tensor(weights, factors), expected, rtol=1e-13, atol=1e-13)


def naive_sweep(x, factors):
    """One CP-ALS sweep with explicit Khatri-Rao products and unfoldings (small tensors)."""
    factors = [f.clone() for f in factors]
    n = x.ndim
    for k in range(n):
        others = [factors[j] for j in range(n) if j != k]
        kr = others[0]
        for f in others[1:]:
            kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, kr.shape[1])
        unfolded = x.movedim(k, 0).reshape(x.shape[k], -1)
        gram = kr.T @ kr
        factors[k] = torch.linalg.solve(gram, (unfolded @ kr).T).T
        if k < n - 1:
            factors[k] = factors[k] / factors[k].norm(dim=0)
    return cp_to_tensor(torch.ones(factors[0].shape[1], dtype=x.dtype), factors)


@pytest.mark.parametrize("shape", [(5, 6), (4, 5, 6), (3, 4, 2, 5), (2, 3, 4, 3, 2)])
def test_one_sweep_matches_naive_als(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=F64)
    init = cp_als(x, 3, n_iter_max=0, init="random", random_state=7)
    one = cp_als(x, 3, n_iter_max=1, init="random", random_state=7)
    assert one.n_iter == 1
    torch.testing.assert_close(
        one.to_tensor(), naive_sweep(x, init.factors), rtol=1e-10, atol=1e-10
    )


# ---------------------------------------------------------------------------- exact recovery
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-8), (torch.float32, 1e-3)], ids=["f64", "f32"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_exact_cp_tensor(dtype, tol, seed):
    x = exact_cp((4, 5, 6, 4, 5, 6), 5, seed, dtype)
    cp = cp_als(x, 5)
    assert isinstance(cp, CPDecomposition)
    assert cp.rel_error < tol
    assert rel(cp.to_tensor().double(), x.double()) < tol
    assert cp.n_iter < 100  # stopped on the exact fit, not on n_iter_max


@pytest.mark.parametrize(("shape", "rank"), [((6, 7), 3), ((4, 5, 6, 7), 3), ((3, 3, 3), 1)])
def test_recovers_small_exact_tensors(shape, rank):
    x = exact_cp(shape, rank, seed=3)
    assert cp_als(x, rank).rel_error < 1e-8


def test_rank_above_every_mode_size():
    x = exact_cp((3, 4, 3), 2, seed=4)
    cp = cp_als(x, 6)  # R > every n_k: init padded with random columns
    assert [tuple(f.shape) for f in cp.factors] == [(3, 6), (4, 6), (3, 6)]
    assert cp.rel_error < 1e-4


# -------------------------------------------------------------------------------- properties
shapes = st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, rank=st.integers(1, 4), seed=st.integers(0, 1000))
def test_result_invariants(shape, rank, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    cp = cp_als(x, rank, n_iter_max=15)
    assert cp.weights.shape == (rank,)
    assert [tuple(f.shape) for f in cp.factors] == [(n, rank) for n in shape]
    assert torch.all(cp.weights >= 0) and torch.all(cp.weights[:-1] >= cp.weights[1:])
    norms = torch.stack([f.norm(dim=0) for f in cp.factors])
    ok = (norms - 1).abs() < 1e-10
    assert torch.all(ok | (cp.weights == 0))
    assert cp.rel_error == pytest.approx(rel(cp.to_tensor(), x), rel=1e-9, abs=1e-12)
    assert 0 <= cp.rel_error <= 1 + 1e-9


@settings(max_examples=15, deadline=None)
@given(shape=shapes, seed=st.integers(0, 1000))
def test_rank_one_tensors_recovered(shape, seed):
    x = exact_cp(shape, 1, seed)
    assert cp_als(x, 1).rel_error < 1e-10


def test_error_non_increasing_over_sweeps():
    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    errors = []
    cp = cp_als(x, 4, n_iter_max=30, tol=0.0, callback=lambda it, e: errors.append((it, e)))
    assert [it for it, _ in errors] == list(range(1, cp.n_iter + 1))
    values = [e for _, e in errors]
    assert all(b <= a + 1e-10 for a, b in zip(values, values[1:]))
    assert cp.rel_error == pytest.approx(values[-1], rel=1e-6)


def test_random_state_makes_results_reproducible():
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(6))
    a = cp_als(x, 8, n_iter_max=5, init="random", random_state=3)
    b = cp_als(x, 8, n_iter_max=5, init="random", random_state=torch.Generator().manual_seed(3))
    c = cp_als(x, 8, n_iter_max=5, init="random", random_state=4)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
    assert not torch.equal(a.weights, c.weights)
    torch.testing.assert_close(cp_als(x, 8).weights, cp_als(x, 8).weights, rtol=0, atol=0)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(3, 4, 5),
        torch.ones(3, 4, 5),
        torch.ones(3, 4, 5) * 1e-30,
        exact_cp((3, 4, 5), 1, seed=8).float(),  # rank-deficient for R = 4
    ],
    ids=["zero", "constant", "tiny", "rank-deficient"],
)
def test_degenerate_inputs_give_no_nan(x):
    cp = cp_als(x, 4)
    assert all(torch.isfinite(t).all() for t in (cp.weights, *cp.factors))
    assert math.isfinite(cp.rel_error) and cp.rel_error < 1e-3


def test_zero_tensor():
    cp = cp_als(torch.zeros(3, 4, 5, dtype=F64), 3)
    assert torch.equal(cp.weights, torch.zeros(3, dtype=F64))
    assert cp.rel_error == 0.0 and cp.n_iter == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    x = exact_cp((4, 5, 6), 2, seed=9).to(dtype)
    cp = cp_als(x, 2)
    assert cp.weights.dtype == dtype and all(f.dtype == dtype for f in cp.factors)
    assert cp.rel_error < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_preserved():
    x = exact_cp((4, 5, 6), 2, seed=10).cuda()
    cp = cp_als(x, 2, random_state=torch.Generator().manual_seed(0))
    assert cp.weights.device == x.device and cp.rel_error < 1e-8


def test_verbose_logs_and_does_not_print(caplog, capsys):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(11))
    with caplog.at_level(logging.INFO, logger="factlin"):
        cp_als(x, 2, n_iter_max=3, verbose=True)
    assert any("cp_als" in r.message for r in caplog.records)
    assert capsys.readouterr() == ("", "")


# -------------------------------------------------------------------------------- bad inputs
GOOD = torch.randn(3, 4, 5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"rank=0: expected a positive int"),
        ({"rank": 2.5}, TypeError, r"rank=2\.5 .*expected a positive int"),
        ({"rank": True}, TypeError, r"rank=True"),
        ({"init": "nope"}, ValueError, r"init='nope' is not known.*'svd', 'random'"),
        ({"init": 3}, TypeError, r"init=3"),
        ({"n_iter_max": -1}, ValueError, r"n_iter_max=-1: expected an int >= 0"),
        ({"tol": -1e-3}, ValueError, r"tol=-0\.001"),
        ({"tol": float("nan")}, ValueError, r"tol=nan"),
        ({"random_state": "seed"}, TypeError, r"random_state='seed'"),
        ({"callback": 3}, TypeError, r"callback=3"),
        ({"memory_limit_bytes": 0}, ValueError, r"memory_limit_bytes=0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"rank": 2, **kwargs}
    with pytest.raises(error, match=match):
        cp_als(GOOD, **kwargs)


@pytest.mark.parametrize(
    ("tensor", "error", "match"),
    [
        ([[1.0, 2.0]], TypeError, r"tensor=.*expected a torch\.Tensor"),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, r"dtype torch\.int64"),
        (torch.ones(5), ValueError, r"shape \(5,\): expected at least 2"),
        (torch.ones(3, 0, 2), ValueError, r"every mode must be non-empty"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, r"1 NaN/inf value"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, r"NaN/inf"),
    ],
)
def test_bad_tensors(tensor, error, match):
    with pytest.raises(error, match=match):
        cp_als(tensor, 2)
