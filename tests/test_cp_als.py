"""Tests for factlin.decompositions.cp_als: reference, exact recovery, properties, bad inputs."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factlin.decompositions import CPDecomposition, cp_als, cp_to_tensor
from factlin.decompositions._linalg import spd_solve_right
from factlin.decompositions.budget import TIME_LIMIT_ENV, TimeLimitError
from factlin.decompositions.cp_als import DEFAULT_TOL, auto_block_size, estimate_cp_als_seconds

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
        ({"line_search": 1}, TypeError, r"line_search=1 .*expected True or False"),
        ({"block_size": 0}, ValueError, r"block_size=0: expected a positive int"),
        ({"block_size": 2.0}, TypeError, r"block_size=2\.0"),
        ({"max_seconds": 0}, ValueError, r"max_seconds=0: expected a finite number of seconds"),
        ({"max_seconds": float("nan")}, ValueError, r"max_seconds=nan"),
        ({"max_seconds": "1"}, TypeError, r"max_seconds='1'"),
        ({"time_limit_seconds": -1.0}, ValueError, r"time_limit_seconds=-1\.0"),
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


# ---------------------------------------------------------- stopping rule, time bound, guard
def test_default_tol_stops_on_the_plateau():
    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(12), dtype=F64)
    errors = []
    cp = cp_als(x, 5, n_iter_max=500, callback=lambda it, e: errors.append(e))
    assert cp.stop_reason == "tol" and cp.n_iter < 500
    gains = [(a - b) / a for a, b in zip(errors, errors[1:])]
    assert gains[-1] <= DEFAULT_TOL  # stopped at the first sweep that gained less than tol
    assert all(g > DEFAULT_TOL for g in gains[:-1])
    longer = cp_als(x, 5, n_iter_max=500, tol=1e-10)
    assert longer.n_iter > cp.n_iter and longer.rel_error <= cp.rel_error + 1e-12


@pytest.mark.parametrize("block_size", [None, 3])
def test_max_seconds_returns_the_fit_so_far(block_size):
    x = torch.randn(8, 9, 10, generator=torch.Generator().manual_seed(13))
    errors = []

    def slow_callback(iteration: int, error: float) -> None:
        # each sweep lasts >= 50 ms whatever the machine: the bound, not convergence, stops it
        errors.append(error)
        time.sleep(0.05)

    cp = cp_als(
        x,
        12,
        n_iter_max=10_000,
        tol=0.0,
        max_seconds=0.3,
        block_size=block_size,
        callback=slow_callback,
    )
    assert cp.stop_reason == "max_seconds"
    assert 1 <= cp.n_iter == len(errors) < 10_000
    assert cp.seconds < 0.3 + 2.0  # about one sweep past the bound (loose: shared machines)
    assert cp.rel_error == pytest.approx(rel(cp.to_tensor(), x), rel=1e-4)
    assert cp.rel_error <= errors[0] + 1e-6  # the fit reached, not the initialization


def test_max_seconds_too_short_for_a_sweep_returns_the_scaled_init():
    x = torch.randn(8, 9, 10, generator=torch.Generator().manual_seed(14))
    cp = cp_als(x, 12, max_seconds=1e-9)
    assert cp.n_iter == 0 and cp.stop_reason == "max_seconds"
    assert 0.0 <= cp.rel_error <= 1.0 and all(torch.isfinite(f).all() for f in cp.factors)


def test_from_linear_reports_the_time_bound():
    from torch import nn

    from factlin import FactorizedLinear

    layer = FactorizedLinear.from_linear(
        nn.Linear(64, 64), rank=0.2, decomposition_kwargs={"max_seconds": 1e-9}
    )
    info = layer.decomposition_info
    assert info["time_limited"] is True and info["stop_reason"] == "max_seconds"
    quick = FactorizedLinear.from_linear(nn.Linear(16, 16), rank=0.2)
    assert quick.decomposition_info["time_limited"] is False


LLM_SHAPE = (16,) * 6  # a 4096 x 4096 weight; 5% of its parameters is R = 8648


def test_time_guard_refuses_at_once_with_the_estimate(monkeypatch):
    monkeypatch.delenv(TIME_LIMIT_ENV, raising=False)
    start = time.perf_counter()
    with pytest.raises(TimeLimitError) as info:
        cp_als(torch.empty(LLM_SHAPE, device="meta"), 8648)
    assert time.perf_counter() - start < 0.5
    message = str(info.value)
    assert "cp_als(shape=(16, 16, 16, 16, 16, 16), rank=8648" in message
    assert "would take an estimated" in message and "above the limit of 10.0 min" in message
    assert "max_seconds" in message and "time_limit_seconds" in message
    assert info.value.estimate_seconds == pytest.approx(
        estimate_cp_als_seconds(LLM_SHAPE, 8648, device="meta")
    )
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs", [{"max_seconds": 60}, {"time_limit_seconds": 1e9}, {"n_iter_max": 1}]
)
def test_time_guard_lets_bounded_requests_through(kwargs, monkeypatch):
    monkeypatch.delenv(TIME_LIMIT_ENV, raising=False)
    with pytest.raises(ValueError, match="meta device: its shape passed"):
        cp_als(torch.empty(LLM_SHAPE, device="meta"), 8648, **kwargs)


def test_time_guard_reads_the_environment(monkeypatch):
    monkeypatch.setenv(TIME_LIMIT_ENV, "1e-6")
    with pytest.raises(TimeLimitError, match=TIME_LIMIT_ENV):
        cp_als(torch.randn(3, 4, 5), 2)
    monkeypatch.setenv(TIME_LIMIT_ENV, "soon")
    with pytest.raises(ValueError, match="expected a positive number of seconds"):
        cp_als(torch.randn(3, 4, 5), 2)


def test_time_estimate_grows_with_the_work():
    shape = (6, 8, 8, 6, 8, 8)
    by_rank = [estimate_cp_als_seconds(shape, r) for r in (100, 1000, 5000)]
    assert by_rank == sorted(by_rank)
    assert estimate_cp_als_seconds(shape, 500, n_iter_max=10) < by_rank[1]
    bounded = estimate_cp_als_seconds(shape, 5000, max_seconds=5.0)
    assert 5.0 < bounded < by_rank[2]


def test_time_limit_error_pickles():
    import pickle

    error = TimeLimitError("slow", 12.0, 6.0)
    back = pickle.loads(pickle.dumps(error))
    assert (str(back), back.estimate_seconds, back.limit_seconds) == ("slow", 12.0, 6.0)


# ------------------------------------------------------------------------- blocks, extrapolation
def test_one_block_is_full_als():
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(15), dtype=F64)
    assert auto_block_size(x.shape, 7) == 7
    a = cp_als(x, 7, n_iter_max=6, tol=0.0)
    b = cp_als(x, 7, n_iter_max=6, tol=0.0, block_size=7)
    torch.testing.assert_close(a.to_tensor(), b.to_tensor(), rtol=0, atol=0)


def test_auto_blocks_above_the_crossover():
    shape = (6, 8, 8, 6, 8, 8)
    assert auto_block_size(shape, 500) == 500
    blocks = auto_block_size(shape, 5000)
    assert 64 <= blocks < 5000 and math.ceil(5000 / blocks) * blocks - 5000 < math.ceil(
        5000 / blocks
    )


@pytest.mark.parametrize("line_search", [True, False])
def test_blocked_sweeps_lower_the_error_like_full_ones(line_search):
    x = torch.randn(5, 6, 4, 5, generator=torch.Generator().manual_seed(16), dtype=F64)
    errors = []
    blocked = cp_als(
        x,
        12,
        n_iter_max=40,
        tol=0.0,
        block_size=4,
        line_search=line_search,
        callback=lambda it, e: errors.append(e),
    )
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))  # exact, monotone
    assert blocked.rel_error == pytest.approx(errors[-1], rel=1e-9)
    full = cp_als(x, 12, n_iter_max=40, tol=0.0, line_search=line_search)
    assert blocked.rel_error < full.rel_error + 0.05
    assert [tuple(f.shape) for f in blocked.factors] == [(n, 12) for n in x.shape]


def test_blocked_recovers_an_exact_tensor():
    x = exact_cp((5, 6, 7), 4, seed=17)
    cp = cp_als(x, 4, block_size=2, n_iter_max=2000, tol=1e-12)
    assert cp.rel_error < 1e-5


def test_line_search_never_raises_the_error():
    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(18), dtype=F64)
    with_ls, without = [], []
    cp_als(x, 6, n_iter_max=30, tol=0.0, callback=lambda it, e: with_ls.append(e))
    cp_als(x, 6, n_iter_max=30, tol=0.0, line_search=False, callback=lambda i, e: without.append(e))
    assert all(b <= a + 1e-12 for a, b in zip(with_ls, with_ls[1:]))
    assert with_ls[0] == pytest.approx(without[0])  # nothing to extrapolate from after sweep 1
    assert with_ls[-1] <= without[-1] + 1e-3


# ---------------------------------------------------------------------- Cholesky fallback
def _ill_conditioned_gram(rank, cond, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))
    values = torch.logspace(0, -math.log10(cond), rank, dtype=torch.float64)
    return ((q * values) @ q.T).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cond", [1e6, 1e12, 1e20])
def test_spd_solve_is_finite_on_ill_conditioned_grams(dtype, cond):
    gram = _ill_conditioned_gram(40, cond, dtype, seed=19)
    rhs = torch.randn(7, 40, generator=torch.Generator().manual_seed(20), dtype=dtype)
    x = spd_solve_right(gram, rhs)
    assert torch.isfinite(x).all()
    # a least-squares quality check: the residual of the regularized solution stays bounded
    assert float(torch.linalg.vector_norm(x @ gram - rhs)) <= 1.01 * float(
        torch.linalg.vector_norm(rhs)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spd_solve_on_rank_deficient_grams(dtype):
    g = torch.Generator().manual_seed(21)
    a = torch.randn(3, 10, generator=g, dtype=dtype)  # rank 3 Gram of size 10
    gram = a.mT @ a
    rhs = torch.randn(4, 3, generator=g, dtype=dtype) @ a  # consistent right-hand side
    x = spd_solve_right(gram, rhs)
    assert torch.isfinite(x).all()
    tol = 1e-3 if dtype == torch.float32 else 1e-6
    assert float(torch.linalg.vector_norm(x @ gram - rhs)) < tol * float(
        torch.linalg.vector_norm(rhs)
    )
    assert torch.equal(
        spd_solve_right(torch.zeros(5, 5, dtype=dtype), rhs[:, :5]), torch.zeros(4, 5, dtype=dtype)
    )


@pytest.mark.parametrize("block_size", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collinear_components_give_no_nan(dtype, block_size):
    # two nearly equal components and a rank far above the tensor's: ill-conditioned,
    # rank-deficient Grams in every mode
    g = torch.Generator().manual_seed(22)
    base = [torch.randn(n, 1, generator=g, dtype=torch.float64) for n in (4, 5, 6)]
    factors = [torch.cat([b, b + 1e-7 * torch.randn_like(b)], dim=1) for b in base]
    x = cp_to_tensor(torch.ones(2, dtype=torch.float64), factors).to(dtype)
    cp = cp_als(x, 9, block_size=block_size)
    assert all(torch.isfinite(t).all() for t in (cp.weights, *cp.factors))
    assert math.isfinite(cp.rel_error) and cp.rel_error < 1e-2
