"""Tests for 'auto' (factlin.cost_model) and the inference cache (factlin.weight_cache)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from factlin import FactorizedLinear, cost_model
from factlin.cost_model import choose_implementation, estimated_seconds


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("batch", [1, 7, 300])
def test_auto_matches_both_implementations(factorization, batch):
    layer = FactorizedLinear(
        (4, 6), (6, 4), factorization=factorization, rank=0.3, dtype=torch.float64
    )
    x = torch.randn(batch, 24, dtype=torch.float64, requires_grad=True)
    outputs = {}
    for implementation in ("factorized", "reconstructed", "auto"):
        layer.implementation = implementation
        y = layer(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        outputs[implementation] = (y.detach(), grad)
        with torch.no_grad():
            outputs[implementation + "-nograd"] = (layer(x), grad)
    for name, (y, grad) in outputs.items():
        torch.testing.assert_close(y, outputs["factorized"][0], msg=name)
        torch.testing.assert_close(grad, outputs["factorized"][1], msg=name)


def test_auto_choice_cached_per_bucket_and_mode():
    layer = FactorizedLinear((8, 8), (8, 8), factorization="tt", rank=0.1, implementation="auto")
    layer(torch.randn(3, 64))
    with torch.no_grad():
        layer(torch.randn(3, 64))
    layer(torch.randn(4, 64))  # same bucket as 3
    assert set(layer._auto_choices) == {(4, True, False, "cpu"), (4, False, True, "cpu")}


def test_cost_model_prefers_reconstructed_for_huge_batches_and_factorized_for_tiny_ranks():
    layer = FactorizedLinear((16, 16, 16), (16, 16, 16), factorization="tt", rank=2)
    # rank 2: the factorized contraction is far cheaper than a dense product at any batch
    assert choose_implementation(layer.weight, 4096, grad=True, cached=False) == "factorized"
    big = FactorizedLinear((8, 8), (8, 8), factorization="tucker", rank="same")
    # with a cached matrix and no grad, the dense product is the floor
    assert choose_implementation(big.weight, 1024, grad=False, cached=True) == "reconstructed"
    assert estimated_seconds(big.weight, "reconstructed", 64, grad=False, cached=True) < (
        estimated_seconds(big.weight, "reconstructed", 64, grad=False, cached=False)
    )


def _counting(layer):
    calls = []
    original = layer.weight.to_matrix

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.weight.to_matrix = counted
    return calls


def test_inference_cache_reuses_and_is_never_stale():
    layer = FactorizedLinear((4, 4), (4, 4), factorization="cp", rank=3)
    layer.implementation = "reconstructed"
    calls = _counting(layer)
    x = torch.randn(5, 16)
    with torch.no_grad():
        first = layer(x)
        layer(x)
        assert len(calls) == 1  # reused
        layer.weight.factors[0].mul_(2.0)  # in-place update
        second = layer(x)
        assert len(calls) == 2
    torch.testing.assert_close(second - layer.bias, 2 * (first - layer.bias))


def test_inference_cache_never_used_with_grad():
    layer = FactorizedLinear(
        (4, 4), (4, 4), factorization="tucker", rank=2, implementation="reconstructed"
    )
    calls = _counting(layer)
    x = torch.randn(5, 16)
    layer(x)
    layer(x)
    assert len(calls) == 2
    with torch.no_grad():
        layer(x)
    y = layer(x)
    assert y.requires_grad and len(calls) == 4


def test_inference_cache_invalidated_by_optimizer_step():
    layer = FactorizedLinear(
        (4, 4), (4, 4), factorization="tt", rank=2, implementation="reconstructed"
    )
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = layer(x)
    layer(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight.to_matrix(), layer.bias)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_inference_cache_invalidated_by_load_state_dict_and_to():
    layer = FactorizedLinear(
        (4, 4), (4, 4), factorization="cp", rank=2, implementation="reconstructed"
    )
    other = FactorizedLinear((4, 4), (4, 4), factorization="cp", rank=2)
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x))
        layer.to(torch.float64)
        torch.testing.assert_close(layer(x.double()), other.double()(x.double()))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    clone = copy.deepcopy(layer)
    assert len(clone._weight_cache) == 0


def test_inference_cache_can_be_disabled_and_cleared():
    layer = FactorizedLinear((4, 4), (4, 4), implementation="reconstructed")
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert len(layer._weight_cache) == 1
    layer.clear_cache()
    assert len(layer._weight_cache) == 0
    layer.inference_cache = False
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert len(layer._weight_cache) == 0


def test_accelerator_profile_prefers_few_launches():
    """On a GPU, launches dominate small problems: the cached dense product (one kernel) beats a
    seven-step factorized plan in inference even where the plan needs far fewer FLOPs, which
    the CPU model says the opposite about. (A 'meta' layer stands for any non-CPU device.)"""
    shape, rank = (8, 8, 12), 0.05
    cpu = FactorizedLinear(shape, shape, factorization="tucker", rank=rank)
    gpu = FactorizedLinear(shape, shape, factorization="tucker", rank=rank, device="meta")
    assert gpu.weight._plan("contract", False, 64).n_steps == 7
    assert choose_implementation(cpu.weight, 64, grad=False, cached=True) == "factorized"
    assert choose_implementation(gpu.weight, 64, grad=False, cached=True) == "reconstructed"
    assert choose_implementation(gpu.weight, 64, grad=True, cached=False) == "reconstructed"


def test_accelerator_profile_picks_factorized_where_flops_dominate():
    """Measured on an H200: a 4096x4096 Tucker layer at rank 0.05 runs its factorized forward in
    0.36x the dense time at batch 1024 (and its training step in 0.71x); at batch 64 launches
    still dominate and the rebuilt matrix wins."""
    shape = (16, 16, 16)
    gpu = FactorizedLinear(shape, shape, factorization="tucker", rank=0.05, device="meta")
    for grad, cached in ((False, True), (True, False)):
        assert choose_implementation(gpu.weight, 1024, grad=grad, cached=cached) == "factorized"
        assert choose_implementation(gpu.weight, 64, grad=grad, cached=cached) == "reconstructed"


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_accelerator_estimates_follow_their_cost_lines(factorization):
    """Each GPU estimate is its fitted line over the plan it prices: the factorized plan alone,
    or the rebuild plan (in training) followed by one dense product."""
    layer = FactorizedLinear((4, 6, 5), (6, 4, 5), factorization=factorization, device="meta")
    weight, batch, gpu = layer.weight, 256, cost_model.GPU
    dense_flops, dense_bytes = 2.0 * batch * 120 * 120, 4.0 * (120 * 120 + batch * 240)
    contract = weight._plan("contract", False, batch, True)
    expected = gpu.factorized_training.seconds(
        contract.n_steps, contract.flops, 4.0 * contract.elements_written
    )
    got = estimated_seconds(weight, "factorized", batch, grad=True, cached=False)
    assert got == pytest.approx(expected)
    rebuild = weight._plan("tensor", False, 0, True)
    expected = gpu.reconstructed_training.seconds(
        rebuild.n_steps + 1,
        rebuild.flops + dense_flops,
        4.0 * rebuild.elements_written + dense_bytes,
    )
    got = estimated_seconds(weight, "reconstructed", batch, grad=True, cached=False)
    assert got == pytest.approx(expected)
    cached = estimated_seconds(weight, "reconstructed", batch, grad=False, cached=True)
    assert cached == pytest.approx(gpu.inference.seconds(1, dense_flops, dense_bytes))
    assert gpu.inference.per_step < gpu.factorized_training.per_step


def test_matrix_vector_products_are_modelled_as_streaming():
    """One matrix-vector product reads the matrix once (measured ~0.1 ns per element here); a
    few rows already go through the general matmul model, which is slower per row."""
    from factlin.contraction import SECONDS_PER_GEMV_ELEMENT, SECONDS_PER_STEP, matmul_seconds

    gemv = matmul_seconds(1, 1, 768, 768)
    assert gemv == SECONDS_PER_GEMV_ELEMENT * (768 + 768 * 768 + 768) + SECONDS_PER_STEP
    assert gemv < matmul_seconds(1, 4, 768, 768)
    assert matmul_seconds(1, 768, 1, 768) == gemv  # either side may be the vector
    # past the caches (768 x 3072 in float32 is 9 MiB) each element costs twice as much
    large = matmul_seconds(1, 1, 3072, 768)
    assert large == 2 * SECONDS_PER_GEMV_ELEMENT * (768 + 768 * 3072 + 3072) + SECONDS_PER_STEP


def test_reconstructed_training_is_costed_with_its_cheaper_backward():
    """Where the factorized backward of 'reconstructed' pays (a Tucker layer at batch 1), the
    model costs that path: rebuild and dense product forward, input gradient, then the
    factorized contraction forward and backward."""
    layer = FactorizedLinear((24, 32), (24, 32), factorization="tucker", rank=0.05)
    weight = layer.weight
    assert weight.rebuilt_linear_pays(1)
    expected = (
        weight._plan("tensor", False, 0, False).seconds
        + 2 * cost_model.dense_seconds(weight, 1)
        + weight._plan("contract", False, 1, True).seconds
    )
    got = cost_model.estimated_seconds(weight, "reconstructed", 1, grad=True, cached=False)
    assert got == expected
    plain = 3 * cost_model.dense_seconds(weight, 1) + weight._plan("tensor", False, 0, True).seconds
    assert got < plain
