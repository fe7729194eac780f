"""Tests for the calibrated fits (factlin/decompositions/calibrated.py, factlin/_calibrated_init.py)
and FactorizedLinear.from_linear / from_linear_list with ``calibration``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _close import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import FACTORIZATION_NAMES
from torch import nn

from factlin import FactorizedLinear
from factlin.decompositions.calibrated import (
    OutputObjective,
    kronecker_factors,
    map_in_modes,
    whitening,
)
from factlin.input_stats import InputStats, PairedInputStats, damped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calibrated_from_linear_leaves_the_linear_unchanged(dtype):
    # regression: with a float64 linear the bias correction was added to linear.bias in place
    linear = nn.Linear(16, 12, dtype=dtype)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    x = torch.randn(100, 16, dtype=dtype) + 0.5
    layer = FactorizedLinear.from_linear(
        linear, rank=0.3, factorization="tucker", n_tensorized_modes=1, calibration=x
    )
    for key, value in linear.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        mean_error = (layer(x) - linear(x)).double().mean(0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(mean_error, torch.zeros_like(mean_error), rtol=0, atol=tol)


# ---- helpers ----------------------------------------------------------------------------------
#: (in_shape, out_shape) per number of tensorized modes: small layers, 12x16 .. 24x18.
SHAPES = {1: ((16,), (12,)), 2: ((4, 4), (3, 4)), 3: ((2, 3, 4), (2, 3, 3))}
#: Few refinement iterations: every property below holds at any iteration count.
FAST = {"n_iter_max": 8}
#: ``output_error`` is sqrt(f / s) with f expanded (s - 2 <W_hat, P> + <W_hat C, W_hat>): its
#: round-off floor is sqrt(eps) ~ 1.5e-8, an absolute tolerance near an exact fit.
FLOOR = 1e-7
#: Few CP-ALS sweeps for the data-free fits (the comparisons use the same on both sides).
FREE = {"cp": {"n_iter_max": 10}, "tucker": {}, "tt": {}}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(rows: int, features: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Correlated, off-center inputs ``(rows, features)``: a far-from-identity covariance."""
    g = _generator(seed)
    mixing = torch.randn(features, features, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -2, features, dtype=torch.float64)
    x = torch.randn(rows, features, generator=g, dtype=torch.float64) * scales @ mixing
    return (x + torch.randn(features, generator=g, dtype=torch.float64)).to(dtype)


def _linears(n: int, in_features: int, out_features: int, bias: bool, seed: int, dtype):
    torch.manual_seed(seed)
    return [nn.Linear(in_features, out_features, bias=bias, dtype=dtype) for _ in range(n)]


def _convert(linears, in_shape, out_shape, calibration=None, **kwargs):
    """from_linear for one linear, from_linear_list for several (same tensorized shapes)."""
    common = {"auto_tensorize": False} if len(linears) == 1 else {}
    if calibration is not None:
        kwargs["calibration"] = calibration[0] if len(linears) == 1 else calibration
    if len(linears) == 1:
        return FactorizedLinear.from_linear(
            linears[0],
            in_tensorized_features=in_shape,
            out_tensorized_features=out_shape,
            **common,
            **kwargs,
        )
    return FactorizedLinear.from_linear_list(linears, in_shape, out_shape, **kwargs)


def _sub(layer, k):
    return layer if layer.n_layers == 1 else layer[k]


@torch.no_grad()
def _output_errors(layer, linears, xs, bias: bool, best_bias: bool = False):
    """The calibrated objective measured on the outputs, in float64:
    ``sqrt(sum_l E||layer_l(x) - linear_l(x)||^2 / sum_l E||y_l - E y_l||^2)`` with a bias
    (the centered output energy), ``... / sum_l E||y_l||^2`` without; ``best_bias`` removes the
    mean error first (what a bias correction would reach). Also the per-layer mean errors."""
    num = den = 0.0
    means = []
    for k, (linear, x) in enumerate(zip(linears, xs)):
        y = linear(x).double()
        diff = _sub(layer, k)(x).double() - y
        means.append(diff.mean(0))
        if best_bias:
            diff = diff - diff.mean(0)
        ref = y - y.mean(0) if bias else y
        num += float(diff.pow(2).sum()) / x.shape[0]
        den += float(ref.pow(2).sum()) / x.shape[0]
    return (num / den) ** 0.5 if den > 0 else 0.0, means


def _check_finite(layer) -> None:
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), name


def _info_is_consistent(info: dict) -> None:
    for key in ("output_error", "output_error_data_free", "output_error_whitened",
                "output_error_start", "rel_error", "refine_seconds", "seconds"):  # fmt: skip
        assert isinstance(info[key], float) and info[key] >= 0 and info[key] == info[key], key
    assert info["start"] in ("data-free", "whitened")
    best_start = min(info["output_error_data_free"], info["output_error_whitened"])
    assert info["output_error_start"] == best_start
    assert info["output_error"] <= info["output_error_start"]  # monotone refinement
    assert isinstance(info["refine_iter"], int) and info["refine_iter"] >= 0


# ---- the properties, for every format and 1-3 tensorized modes --------------------------------
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("modes", [1, 2, 3])
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_calibrated_fit_never_loses_to_the_data_free_fit(factorization, modes, bias, n_layers):
    # every combination once (the property test below draws them at random)
    seed = 1000 * modes + 100 * n_layers + 10 * bias + len(factorization)
    _check_never_loses(factorization, modes, bias, n_layers, 0.35, seed)


@settings(max_examples=8)  # the fits are costly
@given(
    factorization=st.sampled_from(FACTORIZATION_NAMES),
    modes=st.integers(1, 3),
    bias=st.booleans(),
    n_layers=st.integers(1, 3),
    rank=st.floats(0.1, 0.8),
    seed=st.integers(0, 2**16),
)
def test_calibrated_fit_never_loses_property(factorization, modes, bias, n_layers, rank, seed):
    _check_never_loses(factorization, modes, bias, n_layers, rank, seed)


def _check_never_loses(factorization, modes, bias, n_layers, rank, seed):
    in_shape, out_shape = SHAPES[modes]
    in_features, out_features = math.prod(in_shape), math.prod(out_shape)
    linears = _linears(n_layers, in_features, out_features, bias, seed, torch.float64)
    xs = [_inputs(64 + 16 * k, in_features, seed + k) for k in range(n_layers)]
    options = {
        "rank": rank,
        "factorization": factorization,
        "decomposition_kwargs": FREE[factorization],
    }
    layer = _convert(
        linears, in_shape, out_shape, calibration=xs, calibration_kwargs=FAST, **options
    )
    free = _convert(linears, in_shape, out_shape, **options)
    info = layer.decomposition_info
    _info_is_consistent(info)
    _check_finite(layer)
    # (1) the reported error is the error of the returned layer on the calibration inputs
    measured, mean_errors = _output_errors(layer, linears, xs, bias)
    assert measured == pytest.approx(info["output_error"], rel=1e-9, abs=FLOOR)
    # ... and the data-free fit's, on the objective the fit minimizes (best bias when a bias)
    free_error, _ = _output_errors(free, linears, xs, bias, best_bias=bias)
    assert free_error == pytest.approx(info["output_error_data_free"], rel=1e-9, abs=FLOOR)
    assert measured <= free_error + FLOOR
    free_as_is, _ = _output_errors(free, linears, xs, bias)  # data-free bias, uncorrected
    assert measured <= free_as_is + FLOOR
    # (6) bias correction: no mean error on the calibration inputs
    if bias:
        for mean in mean_errors:
            assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-10)
    # the weight error is the weight error of the returned layer
    weights = torch.stack([lin.weight.detach() for lin in linears])
    fitted = layer.weight.to_matrix().detach().reshape(weights.shape)
    rel_error = float((fitted - weights).norm() / weights.norm())
    assert info["rel_error"] == pytest.approx(rel_error, rel=1e-9)


def _identity_stats(features: int, mean: torch.Tensor | None = None, count: int = 100):
    """Statistics of inputs with covariance exactly I (second moment I + mean mean^T)."""
    stats = InputStats(features)
    mean = torch.zeros(features, dtype=torch.float64) if mean is None else mean
    stats.count = count
    stats.sum = count * mean
    stats.sum_outer = count * (torch.eye(features, dtype=torch.float64) + torch.outer(mean, mean))
    return stats


def _orthogonal_design(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with zero mean and second moment exactly I: centered columns, orthonormalized."""
    x = torch.randn(rows, features, generator=_generator(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    return q * rows**0.5


# ---- (2) C = I: the output error is the weight error -----------------------------------------
@pytest.mark.parametrize("modes", [1, 2, 3])
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("bias", [False, True])
def test_identity_covariance_matches_the_data_free_fit(factorization, modes, bias):
    in_shape, out_shape = SHAPES[modes]
    in_features, out_features = math.prod(in_shape), math.prod(out_shape)
    (linear,) = _linears(1, in_features, out_features, bias, 7, torch.float64)
    if bias:  # off-center inputs: the bias absorbs the mean, the covariance is I
        mean = torch.randn(in_features, generator=_generator(3), dtype=torch.float64)
        calibration = _identity_stats(in_features, mean)
    else:
        calibration = _orthogonal_design(40, in_features, 3)
        assert_close(calibration.T @ calibration / 40, torch.eye(in_features), rtol=0, atol=1e-12)
    options = {"rank": 0.4, "factorization": factorization}
    options["decomposition_kwargs"] = FREE[factorization]
    layer = _convert(
        [linear], in_shape, out_shape, [calibration], calibration_kwargs=FAST, **options
    )
    free = _convert([linear], in_shape, out_shape, **options)
    info, free_info = layer.decomposition_info, free.decomposition_info
    # with C = I the relative output error is the relative weight error ...
    assert info["output_error"] == pytest.approx(info["rel_error"], rel=1e-9, abs=FLOOR)
    assert info["output_error_data_free"] == pytest.approx(free_info["rel_error"], rel=1e-9)
    # ... the whitened start is the data-free one (damping only rescales I) ...
    assert info["output_error_whitened"] == pytest.approx(free_info["rel_error"], rel=1e-6)
    # ... and the refinement may only lower it (CP-ALS, HOSVD/HOOI and TT-SVD are not optimal)
    assert info["output_error"] <= free_info["rel_error"] + FLOOR
    if modes == 1 and factorization != "tt":  # the truncated SVD: optimal, nothing to gain
        assert info["output_error"] == pytest.approx(free_info["rel_error"], rel=1e-9)


# ---- (3) exact at full rank -------------------------------------------------------------------
FULL_RANK = [
    ("tucker", 1, 10**6),
    ("tucker", 2, 10**6),
    ("tucker", 3, 10**6),
    ("tt", 2, 10**6),
    ("tt", 3, 10**6),
    ("cp", 1, 12),  # one mode per side: rank min(in, out) = 12 is the full matrix rank
    ("cp", 1, 20),
]


@pytest.mark.parametrize(
    ("factorization", "modes", "rank", "n_layers"),
    # (stacked layers make a 3-way CP tensor, which no rank up to 24 surely recovers)
    [(*case, n) for case in FULL_RANK for n in (1, 2) if case[0] != "cp" or n == 1],
)
def test_exact_at_full_rank(factorization, modes, rank, n_layers):
    in_shape, out_shape = SHAPES[modes]
    in_features, out_features = math.prod(in_shape), math.prod(out_shape)
    linears = _linears(n_layers, in_features, out_features, True, 11, torch.float64)
    xs = [_inputs(50, in_features, 5 + k) for k in range(n_layers)]
    layer = _convert(linears, in_shape, out_shape, xs, rank=rank, factorization=factorization)
    info = layer.decomposition_info
    # output_error is sqrt(f / s) with f = s - 2 <W_hat, P> + <W_hat C, W_hat> expanded: its
    # round-off floor is sqrt(eps) ~ 1.5e-8 (the error measured on the outputs is far lower)
    assert info["output_error"] < 1e-7
    assert info["rel_error"] < 1e-10
    measured, _ = _output_errors(layer, linears, xs, True)
    assert measured < 1e-10
    fresh = torch.randn(9, in_features, dtype=torch.float64)  # not only on the calibration
    for k, linear in enumerate(linears):
        with torch.no_grad():
            assert_close(_sub(layer, k)(fresh), linear(fresh), rtol=1e-9, atol=1e-10)


# ---- (4) degenerate inputs: no NaN ------------------------------------------------------------
def _degenerate(kind: str, features: int) -> torch.Tensor:
    g = _generator(2)
    if kind == "rank-deficient":  # fewer rows than features
        return torch.randn(3, features, generator=g, dtype=torch.float64)
    if kind == "constant":
        return torch.randn(features, generator=g, dtype=torch.float64).expand(20, features)
    if kind == "one-feature":  # every feature but one is zero
        x = torch.zeros(20, features, dtype=torch.float64)
        x[:, 0] = torch.randn(20, generator=g, dtype=torch.float64)
        return x
    return torch.zeros(20, features, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["rank-deficient", "constant", "one-feature", "zero"])
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("bias", [False, True])
def test_degenerate_inputs_give_finite_fits(kind, factorization, bias):
    in_shape, out_shape = SHAPES[2]
    in_features, out_features = math.prod(in_shape), math.prod(out_shape)
    (linear,) = _linears(1, in_features, out_features, bias, 13, torch.float64)
    x = _degenerate(kind, in_features)
    options = {"rank": 0.3, "factorization": factorization}
    options["decomposition_kwargs"] = FREE[factorization]
    layer = _convert([linear], in_shape, out_shape, [x], calibration_kwargs=FAST, **options)
    info = layer.decomposition_info
    _check_finite(layer)
    _info_is_consistent(info)
    measured, _ = _output_errors(layer, [linear], [x], bias)
    assert measured == pytest.approx(info["output_error"], rel=1e-7, abs=FLOOR)
    with torch.no_grad():
        y, y_hat = linear(x), layer(x)
        assert torch.isfinite(layer(torch.randn(5, in_features, dtype=torch.float64))).all()
    if kind == "zero" or (kind == "constant" and bias):
        # nothing varies: the outputs on these inputs are kept exactly (by the bias, or 0 = 0)
        assert info["output_error"] == 0.0
        assert_close(y_hat, y, rtol=1e-10, atol=1e-10)


# ---- (5) one mode per side: the closed-form whitened SVD (SVD-LLM) optimum ----------------------
def _svd_llm_error(weight: torch.Tensor, x: torch.Tensor, rank: int, centered: bool) -> float:
    """Optimal rank-``rank`` relative output error: the tail of the singular values of ``W L``
    (``L L^T`` the covariance or second moment of ``x``), in float64."""
    x = x.double()
    if centered:
        x = x - x.mean(0)
    moment = x.T @ x / x.shape[0]
    lower = torch.linalg.cholesky(moment)
    sigma = torch.linalg.svdvals(weight.double() @ lower)
    return float((sigma[rank:].pow(2).sum() / sigma.pow(2).sum()).sqrt())


@pytest.mark.parametrize("factorization", ["cp", "tucker"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_one_mode_per_side_is_the_whitened_svd_optimum(factorization, bias, rank):
    (linear,) = _linears(1, 24, 20, bias, 17, torch.float64)
    x = _inputs(200, 24, 19)
    layer = FactorizedLinear.from_linear(
        linear,
        rank=rank if factorization == "cp" else (rank, rank),
        factorization=factorization,
        n_tensorized_modes=1,
        calibration=x,
        calibration_kwargs={"damping": 1e-10},
    )
    info = layer.decomposition_info
    expected = _svd_llm_error(linear.weight.detach(), x, rank, centered=bias)
    assert info["output_error"] == pytest.approx(expected, rel=1e-6)
    measured, _ = _output_errors(layer, [linear], [x], bias)
    assert measured == pytest.approx(expected, rel=1e-6)
    assert info["start"] == "whitened" and info["refine_iter"] == 0
    # the data-free truncated SVD is worse on these far-from-white inputs
    assert info["output_error_data_free"] > 1.05 * expected


# ---- options, statistics instead of inputs, float32, sequential statistics --------------------
def test_statistics_and_inputs_give_the_same_fit():
    (linear,) = _linears(1, 16, 12, True, 23, torch.float64)
    x = _inputs(3 * 40, 16, 29)
    batches = x.reshape(3, 40, 16)
    stats = InputStats(16)
    for batch in batches:
        stats.update(batch)
    options = {"rank": 0.3, "factorization": "tt", "n_tensorized_modes": 2}
    from_x = FactorizedLinear.from_linear(
        linear, calibration=batches, calibration_kwargs=FAST, **options
    )  # (*, in)
    from_stats = FactorizedLinear.from_linear(
        linear, calibration=stats, calibration_kwargs=FAST, **options
    )
    # the same statistics up to the summation order; the refinement may amplify round-off
    one_shot = InputStats.from_inputs(batches)
    assert_close(stats.sum_outer, one_shot.sum_outer, rtol=1e-12, atol=1e-12)
    assert_close(from_x.weight.to_matrix(), from_stats.weight.to_matrix(), rtol=1e-6, atol=1e-8)
    assert_close(from_x.bias, from_stats.bias, rtol=1e-6, atol=1e-8)
    assert from_x.decomposition_info["output_error"] == pytest.approx(
        from_stats.decomposition_info["output_error"], rel=1e-9
    )


def test_from_linear_list_mixes_inputs_and_statistics_and_sums_the_errors():
    linears = _linears(3, 16, 12, True, 31, torch.float64)
    xs = [_inputs(30 + 10 * k, 16, 37 + k) for k in range(3)]
    calibration = [xs[0], InputStats.from_inputs(xs[1]), xs[2].float()]
    layer = FactorizedLinear.from_linear_list(
        linears,
        (4, 4),
        (3, 4),
        rank=0.5,
        factorization="tucker",
        calibration=calibration,
        calibration_kwargs=FAST,
    )
    info = layer.decomposition_info
    _info_is_consistent(info)
    xs[2] = xs[2].float().double()  # what the statistics saw
    measured, means = _output_errors(layer, linears, xs, True)
    assert measured == pytest.approx(info["output_error"], rel=1e-9)
    for mean in means:
        assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-10)
    assert layer.bias.shape == (3, 12)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_refine_off_keeps_the_better_start(factorization):
    (linear,) = _linears(1, 24, 18, False, 41, torch.float64)
    x = _inputs(80, 24, 43)
    options = {"rank": 0.3, "factorization": factorization, "n_tensorized_modes": 3}
    options["decomposition_kwargs"] = FREE[factorization]
    results = {}
    for refine in (False, True):
        layer = FactorizedLinear.from_linear(
            linear,
            calibration=x,
            calibration_kwargs={"refine": refine, "n_iter_max": 15},
            **options,
        )
        _info_is_consistent(layer.decomposition_info)
        results[refine] = layer.decomposition_info
    off, on = results[False], results[True]
    assert off["refine_iter"] == 0 and off["output_error"] == off["output_error_start"]
    assert on["output_error_start"] == pytest.approx(off["output_error_start"], rel=1e-12)
    assert 1 <= on["refine_iter"] <= 15
    assert on["output_error"] < off["output_error"]  # the refinement helps on such inputs
    zero = FactorizedLinear.from_linear(
        linear, calibration=x, calibration_kwargs={"n_iter_max": 0}, **options
    )
    assert zero.decomposition_info["refine_iter"] == 0


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]
)
def test_low_precision_linear(dtype, tol):
    (linear,) = _linears(1, 24, 18, True, 47, dtype)
    x = _inputs(100, 24, 53, dtype=dtype)
    layer = FactorizedLinear.from_linear(
        linear, rank=0.4, factorization="tt", n_tensorized_modes=2, calibration=x,
        calibration_kwargs=FAST,
    )  # fmt: skip
    assert layer.weight.to_matrix().dtype == dtype and layer.bias.dtype == dtype
    _check_finite(layer)
    measured, (mean,) = _output_errors(layer, [linear], [x], True)
    assert measured == pytest.approx(layer.decomposition_info["output_error"], rel=tol)
    assert measured < layer.decomposition_info["output_error_data_free"]
    scale = float(linear(x).detach().double().abs().mean())
    assert_close(mean, torch.zeros_like(mean), rtol=0, atol=tol * scale)


@pytest.mark.parametrize("bias", [False, True])
def test_paired_statistics_fit_the_dense_outputs_from_the_compressed_inputs(bias):
    # sequential conversion: the layer sees x' (upstream layers compressed) but must give W x + b
    (linear,) = _linears(1, 16, 12, bias, 59, torch.float64)
    x = _inputs(120, 16, 61)
    x_compressed = x + 0.2 * torch.randn(x.shape, generator=_generator(67), dtype=x.dtype) + 0.1
    paired = PairedInputStats(16)
    paired.update(x, x_compressed)
    options = {"rank": 0.3, "factorization": "tucker", "n_tensorized_modes": 2}
    layer = FactorizedLinear.from_linear(
        linear, calibration=paired, calibration_kwargs=FAST, **options
    )
    info = layer.decomposition_info
    _info_is_consistent(info)
    with torch.no_grad():
        y, y_hat = linear(x), layer(x_compressed)
    ref = y - y.mean(0) if bias else y
    measured = float((y_hat - y).norm() / ref.norm())
    assert measured == pytest.approx(info["output_error"], rel=1e-8)
    if bias:
        mean = (y_hat - y).mean(0)
        assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [2, 5])
def test_paired_statistics_one_mode_is_the_closed_form_optimum(bias, rank):
    # min over rank-r W_hat of E||W x - W_hat x'||^2 (centered with a bias):
    # s - ||T L'||^2 + (tail of the singular values of T L')^2, T = W E[x x'^T] C'^-1, L' L'^T = C'
    (linear,) = _linears(1, 16, 12, bias, 71, torch.float64)
    x = _inputs(150, 16, 73)
    x_compressed = x + 0.1 * torch.randn(x.shape, generator=_generator(79), dtype=x.dtype) + 0.05
    paired = PairedInputStats(16)
    paired.update(x, x_compressed)
    layer = FactorizedLinear.from_linear(
        linear, rank=(rank, rank), factorization="tucker", n_tensorized_modes=1,
        calibration=paired, calibration_kwargs={"damping": 1e-10},
    )  # fmt: skip
    a, b = (x - x.mean(0), x_compressed - x_compressed.mean(0)) if bias else (x, x_compressed)
    w = linear.weight.detach()
    moment, cross = b.T @ b / len(b), a.T @ b / len(a)
    scale = float((w @ (a.T @ a / len(a)) * w).sum())
    target = torch.linalg.solve(moment, (w @ cross).T).T
    sigma = torch.linalg.svdvals(target @ torch.linalg.cholesky(moment))
    optimum = (
        (scale - float(sigma.pow(2).sum()) + float(sigma[rank:].pow(2).sum())) / scale
    ) ** 0.5
    info = layer.decomposition_info
    assert info["output_error"] == pytest.approx(optimum, rel=1e-6)
    with torch.no_grad():
        y = linear(x)
        diff = layer(x_compressed) - y
        ref = y - y.mean(0) if bias else y
    assert float(diff.norm() / ref.norm()) == pytest.approx(optimum, rel=1e-6)


# ---- bad input --------------------------------------------------------------------------------
def _small_linear():
    return nn.Linear(16, 12, dtype=torch.float64)


def test_calibration_of_another_size_names_both_sizes():
    linear = _small_linear()
    with pytest.raises(ValueError, match=r"calibration has shape \(5, 10\).*16"):
        FactorizedLinear.from_linear(linear, calibration=torch.randn(5, 10))
    with pytest.raises(ValueError, match=r"calibration.*10 features.*in_features=16"):
        FactorizedLinear.from_linear(linear, calibration=InputStats(10))
    paired = PairedInputStats(10)
    with pytest.raises(ValueError, match=r"10 features.*16"):
        FactorizedLinear.from_linear(linear, calibration=paired)
    with pytest.raises(ValueError, match="16"):
        FactorizedLinear.from_linear(linear, calibration=torch.tensor(1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration(bad):
    x = torch.randn(8, 16, dtype=torch.float64)
    x[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        FactorizedLinear.from_linear(_small_linear(), calibration=x)


@pytest.mark.parametrize(
    "bad", [[[0.0] * 16], torch.ones(4, 16, dtype=torch.int64), "inputs", 3.0, {"x": 1}]
)
def test_calibration_of_a_wrong_type(bad):
    with pytest.raises(TypeError, match="calibration"):
        FactorizedLinear.from_linear(_small_linear(), calibration=bad)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"dampnig": 0.1}, TypeError, "dampnig.*damping"),
        ({"damping": -0.1}, ValueError, "damping"),
        ({"damping": float("nan")}, ValueError, "damping"),
        ({"damping": "0.1"}, TypeError, "damping"),
        ({"tol": float("inf")}, ValueError, "tol"),
        ({"tol": None}, TypeError, "tol"),
        ({"refine": 1}, TypeError, "refine"),
        ({"n_iter_max": 2.5}, TypeError, "n_iter_max"),
        ({"n_iter_max": True}, TypeError, "n_iter_max"),
        ({"n_iter_max": -1}, ValueError, "n_iter_max"),
        ([("damping", 0.1)], TypeError, "calibration_kwargs"),
    ],
)
def test_bad_calibration_kwargs(options, error, match):
    x = torch.randn(8, 16, dtype=torch.float64)
    with pytest.raises(error, match=match):
        FactorizedLinear.from_linear(_small_linear(), calibration=x, calibration_kwargs=options)
    with pytest.raises(error, match=match):
        FactorizedLinear.from_linear_list(
            [_small_linear()] * 2, (4, 4), (3, 4), rank=0.5, calibration=[x, x],
            calibration_kwargs=options,
        )  # fmt: skip


def test_rel_tol_with_calibration_is_refused():
    x = torch.randn(8, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="rel_tol"):
        FactorizedLinear.from_linear(
            _small_linear(), factorization="tt", calibration=x,
            decomposition_kwargs={"rel_tol": 0.1},
        )  # fmt: skip


def test_from_linear_list_calibration_of_the_wrong_length_or_kind():
    linears = [_small_linear() for _ in range(3)]
    x = torch.randn(8, 16, dtype=torch.float64)
    for bad in ([x, x], [x] * 4, x, InputStats.from_inputs(x)):
        with pytest.raises((TypeError, ValueError), match="3"):
            FactorizedLinear.from_linear_list(linears, (4, 4), (3, 4), rank=0.5, calibration=bad)
    with pytest.raises(ValueError, match=r"calibration\[1\].*10"):
        FactorizedLinear.from_linear_list(
            linears, (4, 4), (3, 4), rank=0.5, calibration=[x, torch.randn(4, 10), x]
        )
    with pytest.raises(TypeError, match=r"calibration\[2\]"):
        FactorizedLinear.from_linear_list(
            linears, (4, 4), (3, 4), rank=0.5, calibration=[x, x, None]
        )


# ---- building blocks --------------------------------------------------------------------------
def _spd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(n, dtype=torch.float64)


def test_kronecker_factors_are_partial_traces():
    a, b, c = _spd(2, 1), _spd(3, 2), _spd(4, 3)
    factors = kronecker_factors(torch.kron(torch.kron(a, b), c), (2, 3, 4))
    traces = [torch.trace(m) for m in (a, b, c)]
    for k, m in enumerate((a, b, c)):
        others = math.prod(float(t) for j, t in enumerate(traces) if j != k)
        assert_close(factors[k], m * others, rtol=1e-12, atol=1e-12)
    (whole,) = kronecker_factors(a, (2,))  # one mode: the moment itself
    assert_close(whole, a, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["full", "rank-1", "zero"])
def test_whitening_is_a_finite_lower_cholesky_factor(kind):
    moment = {"full": _spd(6, 5), "rank-1": torch.ones(6, 6, dtype=torch.float64)}.get(
        kind, torch.zeros(6, 6, dtype=torch.float64)
    )
    lower = whitening(moment, damping=1e-3)
    assert torch.isfinite(lower).all()
    assert torch.equal(lower, torch.tril(lower))
    assert_close(lower @ lower.T, damped(moment, 1e-3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_map_in_modes_right_multiplies_by_the_kronecker_product(factorization, n_layers):
    in_shape, out_shape = (2, 3, 4), (3, 2)  # TT pads the shorter side
    layer = FactorizedLinear(
        in_shape, out_shape, rank=0.5, factorization=factorization, n_layers=n_layers,
        dtype=torch.float64,
    )  # fmt: skip
    before = layer.weight.to_matrix().detach().reshape(n_layers, 6, 24).clone()
    in_modes = layer.weight._contraction_in_shape()
    maps = [torch.randn(n, n, generator=_generator(n), dtype=torch.float64) for n in in_modes]
    map_in_modes(layer.weight, maps)
    kron = maps[0]
    for m in maps[1:]:
        kron = torch.kron(kron, m)
    after = layer.weight.to_matrix().detach().reshape(n_layers, 6, 24)
    assert_close(after, before @ kron.T, rtol=1e-10, atol=1e-12)


def test_output_objective_value_and_relative_error():
    w = torch.randn(2, 5, 6, dtype=torch.float64)
    xs = [torch.randn(40, 6, dtype=torch.float64) + 1 for _ in range(2)]
    stats = [InputStats.from_inputs(x) for x in xs]
    w_hat = w + 0.1 * torch.randn_like(w)
    for centered in (False, True):
        objective = OutputObjective.for_weights(w, stats, centered)
        total = scale = 0.0
        for k, x in enumerate(xs):
            xc = x - x.mean(0) if centered else x
            total += float(((w[k] - w_hat[k]) @ xc.T).pow(2).sum()) / 40
            scale += float((w[k] @ xc.T).pow(2).sum()) / 40
        assert float(objective.value(w_hat)) == pytest.approx(total, rel=1e-10)
        assert objective.relative_error(w_hat) == pytest.approx((total / scale) ** 0.5, rel=1e-10)
        assert objective.relative_error(w) < 1e-7  # exact up to the sqrt(eps) floor
    zero = OutputObjective.for_weights(w, [InputStats(6), InputStats(6)], False)
    assert zero.relative_error(w_hat) == 0.0


# ---- scale invariance and zero layers ---------------------------------------------------------
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_the_fit_does_not_depend_on_the_input_scale(factorization, scale):
    # the objective is relative and the damping relative: scaling every input by a constant
    # changes nothing (without refinement exactly; with it, the result stays at least as good)
    (linear,) = _linears(1, 16, 12, True, 83, torch.float64)
    x = _inputs(60, 16, 89)
    options = {"rank": 0.3, "factorization": factorization, "n_tensorized_modes": 2}
    options["decomposition_kwargs"] = FREE[factorization]
    errors = {}
    for alpha in (1.0, scale):
        layer = FactorizedLinear.from_linear(
            linear, calibration=alpha * x, calibration_kwargs={"refine": False}, **options
        )
        errors[alpha] = layer.decomposition_info["output_error"]
    assert errors[scale] == pytest.approx(errors[1.0], rel=1e-6)
    # refined, in float32 (the most fragile: float32 factors at extreme scales)
    lin = copy.deepcopy(linear).float()
    x32 = (scale * x).float()
    layer = FactorizedLinear.from_linear(lin, calibration=x32, calibration_kwargs=FAST, **options)
    info = layer.decomposition_info
    _check_finite(layer)
    _info_is_consistent(info)
    measured, _ = _output_errors(layer, [lin], [x32], True)
    assert measured == pytest.approx(info["output_error"], rel=1e-3)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_a_zero_weight_stays_zero(factorization):
    linear = nn.Linear(16, 12, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.zero_()
    x = _inputs(30, 16, 97)
    layer = FactorizedLinear.from_linear(
        linear, rank=0.3, factorization=factorization, n_tensorized_modes=2, calibration=x
    )
    info = layer.decomposition_info
    _check_finite(layer)
    assert info["output_error"] == 0.0 and info["rel_error"] == 0.0
    with torch.no_grad():
        assert_close(layer(x), linear(x), rtol=0, atol=1e-12)
