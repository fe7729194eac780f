"""Tests for factlin._rebuilt_linear: 'reconstructed' training with a factorized backward."""

from __future__ import annotations

import pytest
import torch

from factlin import FactorizedLinear, _rebuilt_linear
from factlin.factorizations._base import batch_bucket

FACTORIZATIONS = ["cp", "tucker", "tt"]


def _pair(factorization: str, n_layers: int, **kwargs) -> tuple[FactorizedLinear, FactorizedLinear]:
    """Two identical 'reconstructed' layers (float64)."""
    torch.manual_seed(0)
    first = FactorizedLinear(
        (3, 4), (4, 2), factorization=factorization, rank=0.6, n_layers=n_layers,
        implementation="reconstructed", **kwargs,
    ).double()  # fmt: skip
    second = FactorizedLinear(
        (3, 4), (4, 2), factorization=factorization, rank=0.6, n_layers=n_layers,
        implementation="reconstructed", **kwargs,
    ).double()  # fmt: skip
    second.load_state_dict(first.state_dict())
    return first, second


def _force(layer: FactorizedLinear, batch: int, factorized_backward: bool) -> None:
    layer._factorized_backward[batch_bucket(batch)] = factorized_backward


def _gradients(layer: FactorizedLinear, x: torch.Tensor, index: int, weights: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x, index)
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]
    return y, torch.autograd.grad((y * weights).sum(), inputs)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("leading", [(1,), (5,), (2, 3)])
def test_values_and_gradients_equal_the_plain_backward(factorization, n_layers, leading):
    hybrid, plain = _pair(factorization, n_layers)
    rows = int(torch.tensor(leading).prod())
    _force(hybrid, rows, True)
    _force(plain, rows, False)
    x = torch.randn(*leading, 12, dtype=torch.float64)
    weights = torch.randn(*leading, 8, dtype=torch.float64)
    index = n_layers - 1
    calls = []
    original = _rebuilt_linear._RebuiltLinear.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    _rebuilt_linear._RebuiltLinear.apply = counting
    try:
        y_hybrid, grads_hybrid = _gradients(hybrid, x, index, weights)
    finally:
        _rebuilt_linear._RebuiltLinear.apply = original
    y_plain, grads_plain = _gradients(plain, x, index, weights)
    assert calls, "the factorized backward was not used"
    torch.testing.assert_close(y_hybrid, y_plain)
    for grad_hybrid, grad_plain in zip(grads_hybrid, grads_plain):
        torch.testing.assert_close(grad_hybrid, grad_plain)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_frozen_parameters_and_no_bias(factorization):
    hybrid, plain = _pair(factorization, 1, bias=False)
    for layer in (hybrid, plain):
        next(layer.weight.parameters()).requires_grad_(False)
    _force(hybrid, 4, True)
    _force(plain, 4, False)
    x, weights = torch.randn(4, 12).double(), torch.randn(4, 8).double()
    _, grads_hybrid = _gradients(hybrid, x, 0, weights)
    _, grads_plain = _gradients(plain, x, 0, weights)
    assert len(grads_hybrid) == len(grads_plain)
    for grad_hybrid, grad_plain in zip(grads_hybrid, grads_plain):
        torch.testing.assert_close(grad_hybrid, grad_plain)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_second_derivatives_go_through_the_rebuild(factorization):
    hybrid, plain = _pair(factorization, 1)
    _force(hybrid, 3, True)
    _force(plain, 3, False)
    x = torch.randn(3, 12, dtype=torch.float64)

    def hessian_vector(layer):
        params = list(layer.parameters())
        directions = [torch.ones_like(p) for p in params]
        grads = torch.autograd.grad(layer(x).pow(2).sum(), params, create_graph=True)
        dot = sum((g * d).sum() for g, d in zip(grads, directions))
        return torch.autograd.grad(dot, params)

    for value, expected in zip(hessian_vector(hybrid), hessian_vector(plain)):
        torch.testing.assert_close(value, expected)


def test_functional_call_differentiates_the_parameters_it_was_given():
    """The backward works on the operands of the call, not on the module's attributes."""
    hybrid, plain = _pair("tucker", 1)
    _force(hybrid, 2, True)
    x = torch.randn(2, 12, dtype=torch.float64)
    replaced = {n: (p.detach() * 1.5).requires_grad_() for n, p in plain.named_parameters()}
    y = torch.func.functional_call(hybrid, replaced, (x,))
    grads = torch.autograd.grad(y.sum(), list(replaced.values()))
    for parameter in plain.parameters():
        parameter.data.mul_(1.5)
    expected = torch.autograd.grad(plain(x).sum(), list(plain.parameters()))
    for grad, grad_expected in zip(grads, expected):
        torch.testing.assert_close(grad, grad_expected)


def test_checkpointing_recomputes_through_it():
    hybrid, plain = _pair("tt", 1, checkpointing=True)
    _force(hybrid, 4, True)
    _force(plain, 4, False)
    x, weights = torch.randn(4, 12).double(), torch.randn(4, 8).double()
    _, grads_hybrid = _gradients(hybrid, x, 0, weights)
    _, grads_plain = _gradients(plain, x, 0, weights)
    for grad_hybrid, grad_plain in zip(grads_hybrid, grads_plain):
        torch.testing.assert_close(grad_hybrid, grad_plain)


def test_chosen_where_the_model_says_it_pays():
    """Measured here (fwd+bwd, 1 thread): Tucker 768x768 rank 0.05 at batch 1, 1.7 ms with the
    factorized backward against 4.3 ms without; TT (24, 32) rank 0.2 at batch 1024, 34 ms
    without against 52 ms with. The model agrees on both."""
    tucker = FactorizedLinear((24, 32), (24, 32), factorization="tucker", rank=0.05)
    tt = FactorizedLinear((24, 32), (24, 32), factorization="tt", rank=0.2)
    assert tucker.weight.rebuilt_linear_pays(1)
    assert not tt.weight.rebuilt_linear_pays(1024)


def test_not_used_without_grad_or_under_torch_func():
    layer = FactorizedLinear((3, 4), (4, 2), factorization="cp", implementation="reconstructed")
    x = torch.randn(2, 12)
    _force(layer, 2, True)
    with torch.no_grad():
        assert not layer._takes_factorized_backward(x)
    assert layer._takes_factorized_backward(x)

    def probe(sample: torch.Tensor) -> torch.Tensor:
        assert not layer._takes_factorized_backward(sample)
        return sample.sum()

    torch.func.vmap(probe)(x)


def test_not_used_off_the_cpu():
    """Measured on an H200 (benchmarks/gpu_forward.py, column rec-fb): forced on, it ran 1.33x
    slower than the plain backward (geometric mean of 72 configurations), so a GPU layer keeps
    autograd's backward even where the CPU model says the factorized one pays. ('meta' stands
    for any non-CPU device.)"""
    args = dict(factorization="tucker", rank=0.05, implementation="reconstructed")
    cpu = FactorizedLinear((24, 32), (24, 32), **args)
    other = FactorizedLinear((24, 32), (24, 32), device="meta", **args)
    assert cpu._takes_factorized_backward(torch.randn(1, 768))
    assert not other._takes_factorized_backward(torch.randn(1, 768, device="meta"))
