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
* **GPU** (any non-CPU device): kernels are cheap and launches, Python and autograd's
  bookkeeping are not, so each call is priced by a line
  ``per_call + per_step * steps + per_flop * flops + per_byte * bytes`` over the forward's
  pairwise steps, FLOPs and bytes written (:class:`GPUCosts`). :data:`GPU` holds three lines,
  fitted by ``benchmarks/fit_gpu_profile.py`` to 72 measured configurations on an H200 (torch
  2.11): inference (a factorized plan, or the dense product as a one-step plan), the
  factorized forward + backward, and the reconstructed one (rebuild and dense product, with
  their backward). Training costs several times inference per step: about 150 us against
  35 us there. The factorized backward of ``'reconstructed'`` is not used on a GPU (measured
  1.33x slower than the plain backward there, geometric mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .contraction import ContractionPlan, matmul_seconds
from .factorizations import FactorizedWeight
from .factorizations._base import batch_bucket

__all__ = [
    "choose_implementation",
    "estimated_seconds",
    "dense_seconds",
    "GPU",
    "GPUCosts",
    "GPUProfile",
]

#: Forward + backward cost relative to a forward.
_GRAD_PASSES = 3


@dataclass(frozen=True)
class GPUCosts:
    """One fitted cost line of an accelerator: seconds of a call that runs ``steps`` pairwise
    products doing ``flops`` FLOPs and writing ``bytes`` (forward quantities; a training line
    absorbs its backward into the constants)."""

    per_call: float
    per_step: float
    per_flop: float
    per_byte: float

    def seconds(self, steps: int, flops: float, bytes_written: float) -> float:
        return (
            self.per_call
            + steps * self.per_step
            + flops * self.per_flop
            + bytes_written * self.per_byte
        )


@dataclass(frozen=True)
class GPUProfile:
    """The three cost lines of an accelerator (see the module docstring)."""

    #: A forward without grad: a factorized plan, or the dense product (one step).
    inference: GPUCosts
    #: The factorized forward + backward (the training plan's steps).
    factorized_training: GPUCosts
    #: Rebuild + dense product, forward + backward (the rebuild's steps and one more).
    reconstructed_training: GPUCosts


#: Default accelerator profile: NVIDIA H200, torch 2.11, float32, 2026-11-27
#: (``benchmarks/fit_gpu_profile.py benchmarks/measured/gpu-h200-2026-11-27.json``).
GPU = GPUProfile(
    inference=GPUCosts(per_call=0.0, per_step=3.52e-5, per_flop=2.19e-14, per_byte=0.0),
    factorized_training=GPUCosts(
        per_call=5.5e-4, per_step=1.57e-4, per_flop=4.87e-14, per_byte=2.29e-12
    ),
    reconstructed_training=GPUCosts(
        per_call=2.89e-4, per_step=1.42e-4, per_flop=5.08e-14, per_byte=0.0
    ),
)


def _on_cpu(weight: FactorizedWeight) -> bool:
    return weight.parameter_tensors()[0].device.type == "cpu"


def _itemsize(weight: FactorizedWeight) -> int:
    return weight.parameter_tensors()[0].element_size()


def _dense_size(weight: FactorizedWeight, batch: int) -> tuple[float, float]:
    """FLOPs and bytes written of ``F.linear`` with this weight's shape on ``batch`` rows."""
    n_in, n_out = weight.in_features, weight.out_features
    elements = n_in * n_out + batch * (n_in + n_out)
    return 2.0 * batch * n_in * n_out, elements * _itemsize(weight)


def _gpu_seconds(
    weight: FactorizedWeight, costs: GPUCosts, plan: Optional[ContractionPlan], dense_batch: int
) -> float:
    """``costs`` applied to ``plan`` (if any) followed by a dense product on ``dense_batch``
    rows (if > 0)."""
    steps, flops, written = 0, 0.0, 0.0
    if plan is not None:
        steps, flops = plan.n_steps, float(plan.flops)
        written = float(plan.elements_written) * _itemsize(weight)
    if dense_batch > 0:
        dense_flops, dense_bytes = _dense_size(weight, dense_batch)
        steps, flops, written = steps + 1, flops + dense_flops, written + dense_bytes
    return costs.seconds(steps, flops, written)


def dense_seconds(weight: FactorizedWeight, batch: int) -> float:
    """Modelled time of ``F.linear`` with this weight's shape on ``batch`` rows (no grad)."""
    batch = max(1, batch)
    if _on_cpu(weight):
        return matmul_seconds(1, batch, weight.out_features, weight.in_features)
    return _gpu_seconds(weight, GPU.inference, None, batch)


def estimated_seconds(
    weight: FactorizedWeight, implementation: str, batch: int, *, grad: bool, cached: bool
) -> float:
    """Modelled time of one forward (with backward when ``grad``) at ``batch`` rows."""
    selected = weight.n_layers > 1

    def contract() -> ContractionPlan:
        return weight._plan("contract", selected, batch_bucket(batch), grad)

    if not _on_cpu(weight):
        batch = max(1, batch)
        if implementation == "factorized":
            costs = GPU.factorized_training if grad else GPU.inference
            return _gpu_seconds(weight, costs, contract(), 0)
        if cached and not grad:
            return _gpu_seconds(weight, GPU.inference, None, batch)
        rebuild = weight._plan("tensor", selected, 0, grad)
        costs = GPU.reconstructed_training if grad else GPU.inference
        return _gpu_seconds(weight, costs, rebuild, batch)
    if implementation == "factorized":
        return contract().seconds
    dense = dense_seconds(weight, batch)
    if cached and not grad:
        return dense
    if grad and weight.rebuilt_linear_pays(batch):
        # the factorized backward (factlin._rebuilt_linear): rebuild and dense product forward,
        # the input gradient, then the factorized contraction forward and backward
        return weight._plan("tensor", selected, 0, False).seconds + 2 * dense + contract().seconds
    rebuild = weight._plan("tensor", selected, 0, grad).seconds
    return (_GRAD_PASSES if grad else 1) * dense + rebuild


def choose_implementation(weight: FactorizedWeight, batch: int, *, grad: bool, cached: bool) -> str:
    """``'factorized'`` or ``'reconstructed'``, whichever the model says is faster."""
    bucket = batch_bucket(batch)
    factorized = estimated_seconds(weight, "factorized", bucket, grad=grad, cached=cached)
    reconstructed = estimated_seconds(weight, "reconstructed", bucket, grad=grad, cached=cached)
    return "factorized" if factorized <= reconstructed else "reconstructed"
