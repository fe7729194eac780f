"""The cost model behind ``implementation='auto'``.

For a batch of ``B`` rows the two forwards cost

* factorized: the planned contraction of the input with the factors, whose time the planner
  models step by step (:func:`factlin.contraction.step_seconds`: FLOPs at a rate that drops for
  skinny matrix products, memory traffic, permutation copies, a fixed cost per kernel);
* reconstructed: rebuilding the matrix (its own planned contraction) plus one dense
  ``(B, in) @ (in, out)`` product, modelled by :func:`factlin.contraction.matmul_seconds`.

With gradients, backward costs about two forwards on each side (two products per forward
product), so both sides are multiplied by 3. Without gradients and with the inference cache on,
the rebuilt weight is reused, so the reconstructed side costs the dense product alone. The
decision is made for the power-of-two bucket of ``B`` and cached per bucket by the layer.
"""

from __future__ import annotations

from .contraction import matmul_seconds
from .factorizations import FactorizedWeight
from .factorizations._base import batch_bucket

__all__ = ["choose_implementation", "estimated_seconds", "dense_seconds"]

#: Forward + backward cost relative to a forward.
_GRAD_PASSES = 3


def dense_seconds(in_features: int, out_features: int, batch: int) -> float:
    """Modelled time of ``F.linear`` on ``batch`` rows."""
    return matmul_seconds(1, max(1, batch), out_features, in_features)


def estimated_seconds(
    weight: FactorizedWeight, implementation: str, batch: int, *, grad: bool, cached: bool
) -> float:
    """Modelled time of one forward (with backward when ``grad``) at ``batch`` rows."""
    passes = _GRAD_PASSES if grad else 1
    if implementation == "factorized":
        return passes * weight.contract_seconds(batch)
    dense = dense_seconds(weight.in_features, weight.out_features, batch)
    if cached and not grad:
        return dense
    return passes * (dense + weight.matrix_seconds())


def choose_implementation(weight: FactorizedWeight, batch: int, *, grad: bool, cached: bool) -> str:
    """``'factorized'`` or ``'reconstructed'``, whichever the model says is faster."""
    bucket = batch_bucket(batch)
    factorized = estimated_seconds(weight, "factorized", bucket, grad=grad, cached=cached)
    reconstructed = estimated_seconds(weight, "reconstructed", bucket, grad=grad, cached=cached)
    return "factorized" if factorized <= reconstructed else "reconstructed"
