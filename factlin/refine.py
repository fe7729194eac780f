"""Refinement after conversion: layer-wise distillation by gradient steps.

Each converted layer's own fit is already optimal for its inputs in the dense model (or, in
sequential conversion, for the inputs it receives from the compressed layers upstream). What a
fit cannot see is how its error changes the *downstream* layers' inputs. Refinement trains all
converted layers together, by Adam steps over the calibration batches, so that every converted
layer's output in the compressed model matches the same layer's output in the dense model:

``loss = mean over layers l of ||y'_l - y_l||^2 / ||y_l - mean(y_l)||^2``

with ``y_l`` the dense layer's output on the dense model's activations and ``y'_l`` the
converted layer's output on the compressed model's activations. Gradients flow through the
whole compressed model, so upstream factors also learn to make downstream layers' inputs
right. Only the converted layers' parameters change; both models run in eval mode.

Cost: per step, one forward of the dense model (no autograd) and one forward and backward of
the compressed one on one calibration batch; memory: that batch's activations and two Adam
buffers per converted parameter. The loss over all batches is measured before and after; if
the steps did not lower it, the converted layers are put back as they were.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from .calibration import run_batch

__all__ = ["DEFAULT_REFINE_LR", "check_refine_args", "refine_converted"]

#: Adam's step size: factor entries move by about this much per step.
DEFAULT_REFINE_LR = 1e-4


def _output_hooks(
    layers: dict[str, nn.Module], store: dict[str, torch.Tensor]
) -> list[Any]:
    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            store[name] = output

        return hook

    return [module.register_forward_hook(hook_for(name)) for name, module in layers.items()]


def _loss(dense_out: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = []
    for name, target in dense_out.items():
        y = out.get(name)
        if y is None:
            continue
        target = target.detach().reshape(-1, target.shape[-1])
        energy = (target - target.mean(0)).pow(2).sum().clamp_min(1e-30)
        terms.append((y.reshape(target.shape) - target).pow(2).sum() / energy)
    if not terms:
        raise ValueError("no converted layer was called by the model on a calibration batch")
    return torch.stack(terms).mean()


def refine_converted(
    dense: nn.Module,
    compressed: nn.Module,
    names: Sequence[str],
    batches: Sequence[Any],
    steps: int,
    *,
    lr: float = DEFAULT_REFINE_LR,
) -> dict:
    """Run ``steps`` Adam steps on the converted layers ``names`` of ``compressed`` (see the
    module docstring); batches are used in turn. Returns ``loss_before``, ``loss_after`` (mean
    over the batches), ``steps``, ``seconds`` and ``kept`` (False when the steps were undone)."""
    tic = time.perf_counter()
    dense_layers = {name: dense.get_submodule(name) for name in names}
    layers = {name: compressed.get_submodule(name) for name in names}
    params = []
    seen: set[int] = set()
    for module in layers.values():
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    trainable = {id(p) for p in params}
    frozen = [(p, p.requires_grad) for p in compressed.parameters() if id(p) not in trainable]
    grad_flags = [(p, p.requires_grad) for p in params]
    flags = [(m, m.training) for m in (*dense.modules(), *compressed.modules())]
    saved = [p.detach().clone() for p in params]
    dense_out: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    handles = _output_hooks(dense_layers, dense_out) + _output_hooks(layers, out)

    def batch_loss(batch: Any, grad: bool) -> torch.Tensor:
        dense_out.clear()
        out.clear()
        with torch.no_grad():
            run_batch(dense, batch)
        with torch.set_grad_enabled(grad):
            run_batch(compressed, batch)
            return _loss(dense_out, out)

    def mean_loss() -> float:
        return sum(float(batch_loss(b, False)) for b in batches) / len(batches)

    try:
        dense.eval()
        compressed.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        before = mean_loss()
        first, second = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, steps + 1):
            loss = batch_loss(batches[(step - 1) % len(batches)], True)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g, m, v in zip(params, grads, first, second):
                    if g is None:
                        continue
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    m_hat = m / (1 - beta1**step)
                    v_hat = v / (1 - beta2**step)
                    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
        after = mean_loss()
        kept = math.isfinite(after) and after <= before
        if not kept:
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in (*frozen, *grad_flags):
            p.requires_grad_(flag)
        for module, flag in flags:
            module.training = flag
    return {
        "loss_before": before,
        "loss_after": after if kept else before,
        "steps": steps,
        "seconds": time.perf_counter() - tic,
        "kept": kept,
    }


def check_refine_args(steps: object, lr: object) -> tuple[int, float]:
    """``refine_steps`` (an int >= 0) and ``refine_lr`` (a number > 0), checked."""
    from ._validation import check_int
    from .errors import FactlinError, describe

    steps = check_int("refine_steps", steps, 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"refine_lr={describe(lr)}: expected a number > 0")
    if not math.isfinite(lr) or lr <= 0:
        raise FactlinError(f"refine_lr={lr}: expected a finite number > 0")
    return steps, float(lr)
