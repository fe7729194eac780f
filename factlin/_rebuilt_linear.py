"""``'reconstructed'`` training with a factorized backward.

The ``'reconstructed'`` forward rebuilds the weight matrix ``W`` from the factors and calls
``F.linear``. Left to autograd, its backward forms the dense gradient ``dW = g^T x`` (a GEMM over
the batch) and pushes it back through the rebuild (about two rebuilds more). But ``dW`` has rank
at most ``batch``: the factors' gradients are also the gradients of the *factorized*
contraction of ``x`` with the factors, taken against the output gradient ``g``, which costs in
proportion to the batch instead of to the weight. At small batches that is several times
cheaper (a Tucker or TT layer at batch 1: the backward of the rebuild dominates).

:func:`rebuilt_linear` is that forward (rebuilt matrix, ``F.linear``) with that backward; the
input gradient is still ``g @ W``. The layer uses it where the time model says the factorized
backward is the cheaper one (``FactorizedWeight.rebuilt_linear_pays``), in eager CPU calls
only: under ``torch.compile``, ``torch.jit.trace`` or ``torch.func`` transforms the plain path
runs, and a second derivative (``create_graph=True``) recomputes through the rebuild.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ._typing import Shape
from .contraction import ContractionPlan

__all__ = ["rebuilt_linear", "functorch_active"]


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, ...) is running: a custom backward that
    calls autograd itself cannot run under one. Unknown (no such probe in this torch): yes."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if probe is None else bool(probe())


class _RebuiltLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: Optional[torch.Tensor],
        rebuild: ContractionPlan,
        contract: ContractionPlan,
        in_shape: Shape,
        *operands: torch.Tensor,
    ) -> torch.Tensor:
        matrix = rebuild(*operands).reshape(-1, x.shape[-1])  # (out_features, in_features)
        ctx.plans = (rebuild, contract)
        ctx.in_shape = in_shape
        ctx.save_for_backward(x, bias, matrix, *operands)
        return F.linear(x, matrix, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, bias, matrix, *operands = ctx.saved_tensors
        rebuild, contract = ctx.plans
        needs_x, needs_bias = ctx.needs_input_grad[:2]
        needs_operands = ctx.needs_input_grad[5:]
        if torch.is_grad_enabled():  # create_graph: recompute differentiably, plain autograd
            inputs = [x, bias, *operands]
            needs = [needs_x, needs_bias, *needs_operands]
            wanted = [t for t, need in zip(inputs, needs) if need]
            output = F.linear(x, rebuild(*operands).reshape(matrix.shape), bias)
            found = iter(torch.autograd.grad(output, wanted, grad, create_graph=True))
            grads = [next(found) if need else None for need in needs]
            return (grads[0], grads[1], None, None, None, *grads[2:])
        grad_x = grad @ matrix if needs_x else None
        grad_bias = grad.sum(0) if needs_bias else None
        grad_operands: list[Optional[torch.Tensor]] = [None] * len(operands)
        if any(needs_operands):
            with torch.enable_grad():
                leaves = [o.detach().requires_grad_(n) for o, n in zip(operands, needs_operands)]
                # (batch, in) -> (batch, *in_modes) -> (batch, *out_modes), against g
                y = contract(x.detach().reshape(x.shape[0], *ctx.in_shape), *leaves)
                wanted = [leaf for leaf, need in zip(leaves, needs_operands) if need]
                found = iter(torch.autograd.grad(y, wanted, grad.reshape(y.shape)))
            grad_operands = [next(found) if need else None for need in needs_operands]
        return (grad_x, grad_bias, None, None, None, *grad_operands)


def rebuilt_linear(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    rebuild: ContractionPlan,
    contract: ContractionPlan,
    in_shape: Shape,
    operands: list[torch.Tensor],
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W = rebuild(*operands)`` (reshaped to a matrix), whose
    operand gradients come from ``contract`` (the factorized contraction of ``x``, reshaped to
    ``(batch, *in_shape)``, with the operands, planned for training) instead of from the
    rebuild. ``x`` is 2-D; the operands are the factorization's (views of its parameters)."""
    return _RebuiltLinear.apply(x, bias, rebuild, contract, tuple(in_shape), *operands)
