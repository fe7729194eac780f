"""Matrix products computed in whichever of their two orientations the CPU runs faster.

``a @ b`` and ``(b.mT @ a.mT).mT`` hold the same values, but a CPU BLAS (MKL here) can differ
tenfold between the two: a product whose result has few columns (2 to 15) and 16 or more rows
runs 1.2-5x slower than its transpose (measured, one thread, float32: ``(24576, 24) @ (24, 11)``
takes 1.75 ms, the transposed call 0.3 ms). The contraction planner picks the better orientation
for the forward products (:func:`narrow_penalty` is part of its time model), but autograd
computes the backward products in the orientation of each operand's memory layout, and the
gradient of a factor with a rank under 16 is exactly such a narrow matrix. This module's matmul
carries its own backward that orients each gradient product. It is used on CPU steps whose
backward would otherwise hit the slow case (:func:`backward_is_narrow`), with grad on.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["backward_is_narrow", "is_narrow", "narrow_penalty", "oriented_matmul"]

#: Results with fewer columns than this (and at least two) are slow on a CPU BLAS when their
#: transpose is not: at least this many rows. (One column is a matrix-vector product: fast.)
_NARROW_COLUMNS = 16
#: Modelled slow-down of a narrow product (measured 1.2-5x over sizes, typically 3x).
_NARROW_SLOWDOWN = 3.0
#: Time a narrow product loses per FLOP against its transpose (measured 0.2-1.1e-10 s).
_NARROW_SECONDS_PER_FLOP = 1e-10
#: Extra time of one product through the custom backward (a Python autograd node): ~60 us.
_ORIENTED_OVERHEAD_SECONDS = 6e-5


def is_narrow(rows: int, columns: int) -> bool:
    """Whether a ``(rows, columns)`` product result is in the slow case (2-15 columns, at least
    16 rows): measured 1.2-5x slower than computing its transpose, whatever the summed size."""
    return 2 <= columns < _NARROW_COLUMNS <= rows


def narrow_penalty(rows: int, columns: int) -> float:
    """Factor by which a product with a ``(rows, columns)`` result runs slower than modelled."""
    return _NARROW_SLOWDOWN if is_narrow(rows, columns) else 1.0


def backward_is_narrow(m: int, k: int, n: int) -> bool:
    """Whether orienting the backward of ``(m, k) @ (k, n)`` pays: a gradient, ``(m, k)`` or
    ``(k, n)``, is narrow in one of its orientations (autograd picks the one of its operand's
    memory layout) and the time it may lose there exceeds the custom backward's own overhead."""
    at_risk = 0
    if is_narrow(m, k) or is_narrow(k, m):
        at_risk += 2 * m * k * n
    if is_narrow(k, n) or is_narrow(n, k):
        at_risk += 2 * m * k * n
    return at_risk * _NARROW_SECONDS_PER_FLOP > _ORIENTED_OVERHEAD_SECONDS


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (same number of dims, 2 or 3), transposed when the result would be narrow."""
    if is_narrow(a.shape[-2], b.shape[-1]):
        return torch.matmul(b.mT, a.mT).mT
    return torch.matmul(a, b)


class _OrientedMatmul(torch.autograd.Function):
    """``a @ b`` (as planned) whose two gradient products are each computed in the faster
    orientation."""

    # forward and backward are plain differentiable products: torch.func may batch them itself
    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, Any]:
        a, b = ctx.saved_tensors
        grad_a = _product(grad, b.mT) if ctx.needs_input_grad[0] else None
        grad_b = _product(a.mT, grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def oriented_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for operands of equal rank (2 or 3), its backward products oriented.

    The forward product is computed as given (its orientation is the planner's choice).
    Differentiable to any order: the backward is made of differentiable products."""
    return _OrientedMatmul.apply(a, b)
