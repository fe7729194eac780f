"""Tests for the calibrated fits (factlin/decompositions/calibrated.py, factlin/_calibrated_init.py)
and FactorizedLinear.from_linear / from_linear_list with ``calibration``."""

from __future__ import annotations

import pytest
import torch
from _close import assert_close
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
