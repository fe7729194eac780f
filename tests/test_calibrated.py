"""Tests for the calibrated fits (factlin/decompositions/calibrated.py, factlin/_calibrated_init.py)
and FactorizedLinear.from_linear / from_linear_list with ``calibration``."""

from __future__ import annotations

import math

import pytest
import torch
from _close import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from factlin import FactorizedLinear


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
@pytest.mark.parametrize("modes", [1, 2, 3])
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@settings(max_examples=3)
@given(
    bias=st.booleans(),
    n_layers=st.sampled_from([1, 2]),
    rank=st.floats(0.15, 0.6),
    seed=st.integers(0, 2**16),
)
def test_calibrated_fit_never_loses_to_the_data_free_fit(
    factorization, modes, bias, n_layers, rank, seed
):
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
    assert measured == pytest.approx(info["output_error"], rel=1e-9, abs=1e-12)
    # ... and the data-free fit's, on the objective the fit minimizes (best bias when a bias)
    free_error, _ = _output_errors(free, linears, xs, bias, best_bias=bias)
    assert free_error == pytest.approx(info["output_error_data_free"], rel=1e-9, abs=1e-12)
    assert measured <= free_error + 1e-12
    free_as_is, _ = _output_errors(free, linears, xs, bias)  # data-free bias, uncorrected
    assert measured <= free_as_is + 1e-12
    # (6) bias correction: no mean error on the calibration inputs
    if bias:
        for mean in mean_errors:
            assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-10)
    # the weight error is the weight error of the returned layer
    weights = torch.stack([lin.weight.detach() for lin in linears])
    fitted = layer.weight.to_matrix().detach().reshape(weights.shape)
    rel_error = float((fitted - weights).norm() / weights.norm())
    assert info["rel_error"] == pytest.approx(rel_error, rel=1e-9)
