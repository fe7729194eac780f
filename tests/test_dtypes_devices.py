"""FactorizedLinear in every floating dtype and on every available device, moves with ``.to()``,
and the input checks (wrong dtype or device, NaN passed through like nn.Linear)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, FACTORIZATIONS
from torch import nn

from factlin import FactorizedLinear, InputError

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")

#: Bound on ``||result - float64 result|| / ||float64 result||`` per dtype.
RELATIVE_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 6e-2,
}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def _run(layer: FactorizedLinear, x: torch.Tensor, index: int) -> tuple[torch.Tensor, list]:
    """Output, then the gradients of x and of every parameter for a fixed upstream gradient."""
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x, index)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y))
    return y.detach(), [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_forward_and_backward_in_every_dtype(factorization, dtype, device):
    torch.manual_seed(0)
    layer = FactorizedLinear(
        (4, 2),
        (2, 4),
        factorization=factorization,
        rank=0.5,
        n_layers=2,
        device=device,
        dtype=dtype,
    )
    assert all(p.dtype == dtype and p.device.type == device for p in layer.parameters())
    reference = copy.deepcopy(layer).to(torch.float64)
    x = torch.randn(5, 8, device=device, dtype=dtype)
    tolerance = RELATIVE_TOLERANCE[dtype]
    for implementation in IMPLEMENTATIONS:
        layer.implementation = reference.implementation = implementation
        y, grads = _run(layer, x, 1)
        y_ref, grads_ref = _run(reference, x.double(), 1)
        assert y.dtype == dtype and y.device.type == device and y.shape == (5, 8)
        assert _relative_error(y, y_ref) < tolerance, implementation
        for grad, grad_ref in zip(grads, grads_ref):
            assert grad.dtype == dtype and torch.isfinite(grad).all()
            assert _relative_error(grad, grad_ref) < 4 * tolerance, implementation
        with torch.no_grad():  # the inference-cache path
            assert _relative_error(layer(x, 1), y_ref) < tolerance, implementation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_from_linear_in_every_dtype(factorization, dtype, device):
    torch.manual_seed(0)
    linear = nn.Linear(6, 4, device=device, dtype=dtype)
    layer = FactorizedLinear.from_linear(
        linear,
        factorization=factorization,
        rank=0.5,
        decomposition_kwargs={"n_iter_max": 5} if factorization != "tt" else None,
    )
    assert all(p.dtype == dtype and p.device == linear.weight.device for p in layer.parameters())
    matrix = layer.weight.to_matrix()
    assert torch.isfinite(matrix).all()
    # The layer's weight is as close to the linear's as the decomposition reported.
    error = _relative_error(matrix, linear.weight.detach())
    assert error <= layer.decomposition_info["rel_error"] + RELATIVE_TOLERANCE[dtype] * 4
    x = torch.randn(3, 6, device=device, dtype=dtype)
    expected = F.linear(x.double(), matrix.double(), linear.bias.double())
    for implementation in IMPLEMENTATIONS:
        layer.implementation = implementation
        y = layer(x)
        assert y.dtype == dtype
        assert _relative_error(y, expected) < RELATIVE_TOLERANCE[dtype]


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_to_keeps_plans_and_refreshes_the_cache(factorization):
    torch.manual_seed(0)
    layer = FactorizedLinear((2, 3), (3, 2), factorization=factorization, rank=2, n_layers=2)
    x = torch.randn(4, 6)
    before = {}
    for implementation in IMPLEMENTATIONS:
        layer.implementation = implementation
        before[implementation] = layer(x, 1).detach()
        with torch.no_grad():
            before[implementation, "cached"] = layer(x, 1)  # fills the inference cache
    plans = dict(layer.weight._plans)
    assert plans

    layer.to(torch.float64)
    reference = FactorizedLinear(
        (2, 3), (3, 2), factorization=factorization, rank=2, n_layers=2, dtype=torch.float64
    )
    reference.load_state_dict(layer.state_dict())
    for implementation in IMPLEMENTATIONS:
        layer.implementation = reference.implementation = implementation
        want = reference(x.double(), 1)
        torch.testing.assert_close(layer(x.double(), 1), want, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            got = layer(x.double(), 1)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)

    layer.to(torch.float32)  # float32 -> float64 -> float32 is exact
    for implementation in IMPLEMENTATIONS:
        layer.implementation = implementation
        torch.testing.assert_close(layer(x, 1), before[implementation], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(
                layer(x, 1), before[implementation, "cached"], rtol=0, atol=0
            )
    # The plans depend on shapes only: the same objects served every dtype.
    assert all(layer.weight._plans[key] is plan for key, plan in plans.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_moving_between_devices(factorization):
    layer = FactorizedLinear((2, 3), (3, 2), factorization=factorization, rank=2)
    x = torch.randn(4, 6)
    expected = layer(x).detach()
    layer.to("cuda")
    torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="x is on device cpu but the layer's parameters are on"):
        layer(x)
    cpu_layer = FactorizedLinear((2, 3), (3, 2), factorization=factorization, rank=2)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)  # saved from CUDA, loaded on the CPU
    buffer.seek(0)
    cpu_layer.load_state_dict(torch.load(buffer, weights_only=True, map_location="cpu"))
    torch.testing.assert_close(cpu_layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.to("cpu")
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_meta_device_for_deferred_initialization(factorization):
    with torch.device("meta"):
        layer = FactorizedLinear((2, 3), (3, 2), factorization=factorization, n_layers=2)
    assert layer.weight_reference.is_meta
    assert layer(torch.empty(4, 6, device="meta"), 1).shape == (4, 6)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.isfinite(layer(torch.randn(4, 6), 1)).all()


# ---- input checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_wrong_dtype_or_device_is_a_clear_error(factorization, implementation):
    layer = FactorizedLinear(
        (2, 3), (3, 2), factorization=factorization, implementation=implementation
    )
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but .* torch.float32"):
        layer(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x has dtype torch.int64"):
        layer(torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(InputError, match=r"x is on device meta but .* on cpu: move one"):
        layer(torch.empty(2, 6, device="meta"))
    half = copy.deepcopy(layer).to(torch.float16)
    with pytest.raises(TypeError, match=r"x has dtype torch.float32 .* torch.float16"):
        half(torch.randn(2, 6))


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_nan_and_inf_pass_through_like_nn_linear(factorization, implementation, n_layers):
    layer = FactorizedLinear(
        (2, 3),
        (3, 2),
        factorization=factorization,
        implementation=implementation,
        n_layers=n_layers,
        dtype=torch.float64,
    )
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    x[0, 1, 2] = float("nan")
    x[2, 0, 0] = float("inf")
    for index in range(n_layers):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                y = layer(x, index)
            dense = F.linear(x, layer.weight.to_matrix(index), layer[index].bias)
            assert torch.equal(torch.isfinite(y), torch.isfinite(dense))
            assert torch.isnan(y[0, 1]).all() and not torch.isfinite(y[2, 0]).all()
            finite = torch.isfinite(dense)
            torch.testing.assert_close(y[finite], dense[finite], rtol=1e-10, atol=1e-12)
