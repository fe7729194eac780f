"""Tests for factlin._matmul: products whose backward is computed in the faster orientation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from factlin import _matmul, contraction
from factlin._matmul import backward_is_narrow, is_narrow, oriented_matmul
from factlin.contraction import plan_contraction


def test_narrow_means_a_few_columns_and_many_rows():
    assert is_narrow(24576, 11)
    assert is_narrow(16, 2)
    assert not is_narrow(24576, 16)  # 16 columns run at full speed
    assert not is_narrow(24576, 1)  # a matrix-vector product
    assert not is_narrow(15, 11)  # its transpose is narrow too: nothing to gain
    assert not is_narrow(11, 24576)


def test_backward_is_oriented_only_where_it_pays():
    assert backward_is_narrow(24, 11, 24576)  # a Tucker factor against a large intermediate
    assert not backward_is_narrow(7, 12, 64)  # narrow but tiny: the overhead would dominate
    assert not backward_is_narrow(768, 768, 768)


@given(
    batch=st.sampled_from([(), (3,)]),
    m=st.integers(1, 40),
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    transpose_a=st.booleans(),
    transpose_b=st.booleans(),
)
def test_values_and_gradients_equal_matmul(batch, m, k, n, transpose_a, transpose_b):
    generator = torch.Generator().manual_seed(m * 1681 + k * 41 + n)
    a = torch.randn(*batch, k, m, dtype=torch.float64, generator=generator).mT
    b = torch.randn(*batch, n, k, dtype=torch.float64, generator=generator).mT
    if not transpose_a:
        a = a.contiguous()
    if not transpose_b:
        b = b.contiguous()
    a.requires_grad_()
    b.requires_grad_()
    weights = torch.randn(*batch, m, n, dtype=torch.float64, generator=generator)
    expected = torch.matmul(a, b)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (a, b))
    result = oriented_matmul(a, b)
    grads = torch.autograd.grad((result * weights).sum(), (a, b))
    torch.testing.assert_close(result, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_second_derivatives():
    a = torch.randn(20, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(oriented_matmul, (a, b))


def test_only_the_needed_gradient_is_computed():
    a = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64)
    oriented_matmul(a, b).sum().backward()
    torch.testing.assert_close(a.grad, torch.ones(30, 5, dtype=torch.float64) @ b.T)


def test_plans_orient_narrow_backward_steps(monkeypatch):
    """A Tucker rebuild whose last product meets an 11-column factor: the step is routed through
    the oriented product (with grad on, on CPU) and gradients equal einsum's."""
    calls = []
    real = _matmul._OrientedMatmul.apply

    def counting(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(contraction, "oriented_matmul", counting)
    equation = "efgh,ae,bf,cg,dh->abcd"
    shapes = [(11, 15, 11, 15), (24, 11), (32, 15), (24, 11), (32, 15)]
    operands = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    plan = plan_contraction(equation, shapes)
    weights = torch.randn(24, 32, 24, 32, dtype=torch.float64)
    grads = torch.autograd.grad((plan(*operands) * weights).sum(), operands)
    expected = torch.autograd.grad((torch.einsum(equation, *operands) * weights).sum(), operands)
    assert calls, "no step was oriented"
    for grad, expected_grad in zip(grads, expected):
        torch.testing.assert_close(grad, expected_grad)
    calls.clear()
    with torch.no_grad():
        plan(*operands)
    assert not calls  # nothing to orient without a backward


@pytest.mark.parametrize("rows, columns, slower", [(4096, 8, True), (4096, 16, False)])
def test_time_model_charges_narrow_products(rows, columns, slower):
    """Measured: (4096, 8) results take 3-4x their transposes, (4096, 16) ones 0.9-1.2x."""
    ratio = contraction.matmul_seconds(1, rows, columns, 64) / contraction.matmul_seconds(
        1, columns, rows, 64
    )
    assert ratio > 2 if slower else ratio < 1.5


def test_composes_with_torch_func():
    """vmap over a batch of inputs and per-sample gradients go through the custom backward."""
    a = torch.randn(5, 40, 6, dtype=torch.float64)
    b = torch.randn(6, 3, dtype=torch.float64)

    def loss(a_one: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return oriented_matmul(a_one, b).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(0, None))(a, b)
    expected = torch.stack([2 * a_one.T @ (a_one @ b) for a_one in a])
    torch.testing.assert_close(per_sample, expected)
