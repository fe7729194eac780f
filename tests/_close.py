"""A light ``assert_close`` for the calibration tests.

``torch.testing.assert_close`` imports sympy on its first call (~5 s on a loaded 2-core
machine); these tests compare plain float tensors and need none of its generality.
"""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, same shape, no NaN."""
    assert actual.shape == expected.shape, (
        f"shapes {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"non-finite values in {a}"
    excess = (a - e).abs() - (atol + rtol * e.abs())
    worst = float(excess.max()) if excess.numel() else -1.0
    assert worst <= 0, (
        f"not close: max |diff| = {float((a - e).abs().max()):.3e} (rtol={rtol}, atol={atol})"
    )
