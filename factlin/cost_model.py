"""The cost model behind ``implementation='auto'``.

For a batch of ``B`` rows the two forwards cost

* factorized: the planned contraction of the input with the factors;
* reconstructed: rebuilding the matrix (its own planned contraction) plus one dense
  ``(B, in) @ (in, out)`` product.

With gradients, the plans are the ones chosen for training, whose modelled time includes their
backward step by step (each product's two gradient products, copies back); the dense product
counts 3 times (forward, two gradients). Without gradients and with the inference cache on,
the rebuilt weight is reused, so the reconstructed side costs the dense product alone. On a CPU
with gradients, the reconstructed side may take its factorized backward
(:mod:`factlin._rebuilt_linear`), where that is the cheaper backward, and is costed so. The
decision is made for the power-of-two bucket of ``B`` and cached per bucket by the layer.

Time comes from one of two device profiles:

* **CPU**: the planner's own step-by-step model (:func:`factlin.contraction.step_seconds`: FLOPs
  at a rate that drops for skinny matrix products, memory traffic, permutation copies, a fixed
  cost per step), fitted on this project's CPUs, and :func:`factlin.contraction.matmul_seconds`
  for the dense product.
* **GPU** (any non-CPU device): kernels are cheap and launches are not, so time is
  ``steps * STEP + flops / RATE + bytes / BANDWIDTH`` with the constants of :data:`GPU`
  (measured on an H200 through PyTorch: about 40 us per pairwise step of a plan, launches and
  Python included).
"""

from __future__ import annotations

from dataclasses import dataclass

from .contraction import ContractionPlan, matmul_seconds
from .factorizations import FactorizedWeight
from .factorizations._base import batch_bucket

__all__ = ["choose_implementation", "estimated_seconds", "dense_seconds", "GPU", "GPUProfile"]

#: Forward + backward cost relative to a forward.
_GRAD_PASSES = 3


@dataclass(frozen=True)
class GPUProfile:
    """Throughput constants of an accelerator (see the module docstring)."""

    seconds_per_step: float
    flops_per_second: float
    bytes_per_second: float

    def seconds(self, steps: int, flops: float, elements: float, itemsize: int) -> float:
        return (
            steps * self.seconds_per_step
            + flops / self.flops_per_second
            + elements * itemsize / self.bytes_per_second
        )


#: Default accelerator profile.
GPU = GPUProfile(seconds_per_step=4e-5, flops_per_second=2e13, bytes_per_second=2e12)


def _on_cpu(weight: FactorizedWeight) -> bool:
    return weight.parameter_tensors()[0].device.type == "cpu"


def _itemsize(weight: FactorizedWeight) -> int:
    return weight.parameter_tensors()[0].element_size()


def _plan_seconds(weight: FactorizedWeight, plan: ContractionPlan, grad: bool) -> float:
    """Modelled time of ``plan`` (chosen with its backward when ``grad``, and then timed with it
    on a CPU; a GPU backward is counted as two more forwards)."""
    if _on_cpu(weight):
        return plan.seconds
    passes = _GRAD_PASSES if grad else 1
    return passes * GPU.seconds(plan.n_steps, plan.flops, plan.elements_written, _itemsize(weight))


def dense_seconds(weight: FactorizedWeight, batch: int) -> float:
    """Modelled time of ``F.linear`` with this weight's shape on ``batch`` rows."""
    batch, n_in, n_out = max(1, batch), weight.in_features, weight.out_features
    if _on_cpu(weight):
        return matmul_seconds(1, batch, n_out, n_in)
    elements = n_in * n_out + batch * (n_in + n_out)
    return GPU.seconds(1, 2.0 * batch * n_in * n_out, elements, _itemsize(weight))


def estimated_seconds(
    weight: FactorizedWeight, implementation: str, batch: int, *, grad: bool, cached: bool
) -> float:
    """Modelled time of one forward (with backward when ``grad``) at ``batch`` rows."""
    passes = _GRAD_PASSES if grad else 1
    selected = weight.n_layers > 1
    if implementation == "factorized":
        plan = weight._plan("contract", selected, batch_bucket(batch), grad)
        return _plan_seconds(weight, plan, grad)
    dense = dense_seconds(weight, batch)
    if cached and not grad:
        return dense
    rebuild = _plan_seconds(weight, weight._plan("tensor", selected, 0, grad), grad)
    if grad and _on_cpu(weight) and weight.rebuilt_linear_pays(batch):
        # the factorized backward (factlin._rebuilt_linear): rebuild and dense product forward,
        # the input gradient, then the factorized contraction forward and backward
        return (
            weight._plan("tensor", selected, 0, False).seconds
            + 2 * dense
            + weight._plan("contract", selected, batch_bucket(batch), True).seconds
        )
    return passes * dense + rebuild


def choose_implementation(weight: FactorizedWeight, batch: int, *, grad: bool, cached: bool) -> str:
    """``'factorized'`` or ``'reconstructed'``, whichever the model says is faster."""
    bucket = batch_bucket(batch)
    factorized = estimated_seconds(weight, "factorized", bucket, grad=grad, cached=cached)
    reconstructed = estimated_seconds(weight, "reconstructed", bucket, grad=grad, cached=cached)
    return "factorized" if factorized <= reconstructed else "reconstructed"
