"""Tests for factlin.contraction and the plan cache of factorized weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from factlin import FactorizedLinear
from factlin.contraction import input_first_path, plan_contraction
from factlin.factorizations._base import batch_bucket


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("ab,bc->ac", [(3, 4), (4, 5)]),
        ("zab,ar,br,r->zr", [(6, 2, 3), (2, 4), (3, 4), (4,)]),
        ("abc,cd,de->abe", [(2, 3, 4), (4, 5), (5, 6)]),
        ("ab->ba", [(2, 3)]),
    ],
)
@pytest.mark.parametrize("input_first", [False, True])
def test_plan_matches_einsum(equation, shapes, input_first):
    operands = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    plan = plan_contraction(equation, shapes, input_first=input_first)
    torch.testing.assert_close(plan(*operands), torch.einsum(equation, *operands))


def test_input_first_never_contracts_factors_together():
    # x with three TT-like cores: every pairwise step must involve the running intermediate
    equation = "Zdef,adh,hbei,icf->Zabc"
    shapes = [(64, 4, 8, 8), (8, 4, 30), (30, 4, 8, 31), (31, 8, 8)]
    plan = plan_contraction(equation, shapes, input_first=True)
    letters_of_x = set("Zdef")
    for step, (_, step_equation) in enumerate(plan.steps):
        inputs = step_equation.split("->")[0].split(",")
        assert "Z" in "".join(inputs), f"step {step} {step_equation} does not involve the input"
    assert letters_of_x


def test_vector_operands_are_folded_first():
    path = input_first_path("Zab,r,ar,br->Zr", [(8, 3, 4), (5,), (3, 5), (4, 5)])
    assert path[0] == (1, 2)  # the weight vector joins the smaller factor before anything else


def test_batch_bucket():
    assert [batch_bucket(b) for b in (0, 1, 2, 3, 64, 65, 10**9)] == [1, 1, 2, 4, 64, 128, 1 << 14]


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_plans_are_built_once_and_reused(factorization):
    layer = FactorizedLinear((4, 6), (6, 4), factorization=factorization, rank=0.3)
    x = torch.randn(10, 24)
    layer(x)
    plans = dict(layer.weight._plans)
    assert len(plans) == 1
    for _ in range(3):
        layer(x)
        layer(torch.randn(2, 5, 24))  # a new input rank, same bucket (10 rows): same plan
    assert len(layer.weight._plans) == 1
    assert all(layer.weight._plans[k] is p for k, p in plans.items())
    layer(torch.randn(100, 24))  # a new batch bucket
    assert len(layer.weight._plans) == 2
    layer.to(torch.float64)  # plans depend on shapes only and survive .to()
    assert len(layer.weight._plans) == 2
    y = layer(x.double())
    expected = x.double() @ layer.weight.to_matrix().T + layer.bias
    torch.testing.assert_close(y, expected)


def test_plan_execution_does_not_replan(monkeypatch):
    layer = FactorizedLinear((4, 6), (6, 4), factorization="tucker", rank=0.3)
    x = torch.randn(10, 24)
    layer(x)
    import opt_einsum

    def fail(*args, **kwargs):
        raise AssertionError("contract_path called on a cached plan")

    monkeypatch.setattr(opt_einsum, "contract_path", fail)
    layer(x)
    layer.implementation = "reconstructed"
    with pytest.raises(AssertionError):  # first reconstruction plans once...
        layer(x)


@given(batch=st.integers(1, 300))
def test_cached_plan_result_equals_uncached(batch):
    layer = FactorizedLinear((3, 4), (2, 5), factorization="cp", rank=4, dtype=torch.float64)
    x = torch.randn(batch, 12, dtype=torch.float64)
    cached = layer(x)
    layer.weight._plans.clear()
    torch.testing.assert_close(layer(x), cached, rtol=0, atol=0)
    torch.testing.assert_close(cached, x @ layer.weight.to_matrix().T + layer.bias)
