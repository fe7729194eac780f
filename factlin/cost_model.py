"""The cost model behind ``implementation='auto'``.

For a batch of ``B`` rows, the two forwards cost

* factorized: the planned contraction, ``F(B)`` FLOPs in ``s`` small kernels;
* reconstructed: rebuilding the matrix (``R`` FLOPs, a few kernels) plus one dense
  ``2 * B * in * out`` product.

With gradients, backward roughly doubles each side (two products per forward product), so both
sides are multiplied by 3; the comparison is unchanged except for the fixed per-kernel cost.
Without gradients and with the inference cache on, the reconstructed weight is rebuilt once and
reused, so its cost is the dense product alone.

Time is estimated as ``flops / FLOP_RATE + kernels * KERNEL_OVERHEAD_S``; the constants are
rough CPU figures: only their ratio matters, and it only decides near the crossover point, where
both choices cost about the same. The decision is cached per power-of-two batch bucket.
"""

from __future__ import annotations

from .factorizations import FactorizedWeight
from .factorizations._base import batch_bucket

__all__ = ["choose_implementation", "estimated_seconds", "FLOP_RATE", "KERNEL_OVERHEAD_S"]

#: Sustained FLOP rate assumed for einsum/matmul kernels (FLOP/s).
FLOP_RATE = 2.0e10
#: Fixed cost of one kernel call from Python (seconds).
KERNEL_OVERHEAD_S = 6.0e-6
#: Kernels used by the reconstructed path besides the rebuild (the linear itself).
_DENSE_KERNELS = 1


def estimated_seconds(
    weight: FactorizedWeight, implementation: str, batch: int, *, grad: bool, cached: bool
) -> float:
    """Estimated time of one forward (with backward when ``grad``) at ``batch`` rows."""
    passes = 3 if grad else 1
    if implementation == "factorized":
        flops = weight.contract_flops(batch)
        kernels = weight.contract_steps()
    else:
        dense = 2 * batch * weight.in_features * weight.out_features
        if cached and not grad:
            flops, kernels = dense, _DENSE_KERNELS
        else:
            rebuild = weight.matrix_flops()
            flops = dense + rebuild
            kernels = _DENSE_KERNELS + len(weight._plan("tensor", weight.n_layers > 1, 0).steps)
    return passes * (flops / FLOP_RATE + kernels * KERNEL_OVERHEAD_S)


def choose_implementation(weight: FactorizedWeight, batch: int, *, grad: bool, cached: bool) -> str:
    """``'factorized'`` or ``'reconstructed'``, whichever the model says is faster."""
    bucket = batch_bucket(batch)
    factorized = estimated_seconds(weight, "factorized", bucket, grad=grad, cached=cached)
    reconstructed = estimated_seconds(weight, "reconstructed", bucket, grad=grad, cached=cached)
    return "factorized" if factorized <= reconstructed else "reconstructed"
