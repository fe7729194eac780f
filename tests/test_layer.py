"""Tests for factlin.layer.FactorizedLinear: reference checks, properties, bad input."""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import layer_configs

from factlin import FactorizedLinear, SubFactorizedLinear

SEED_SIGNATURE = (
    "(in_tensorized_features, out_tensorized_features, bias=True, factorization='cp', "
    "rank='same', implementation='factorized', n_layers=1, checkpointing=False, device=None, "
    "dtype=None)"
)


def test_constructor_signature_is_the_seed_one():
    signature = inspect.signature(FactorizedLinear.__init__)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    text = str(signature.replace(parameters=params[1:], return_annotation=inspect.Signature.empty))
    assert text == SEED_SIGNATURE


def test_attributes():
    layer = FactorizedLinear((8, 8, 12), (8, 16, 24), factorization="Tucker", rank=0.1)
    assert type(layer.in_features) is int and layer.in_features == 768
    assert type(layer.out_features) is int and layer.out_features == 3072
    assert layer.in_tensorized_features == (8, 8, 12)
    assert layer.out_tensorized_features == (8, 16, 24)
    assert layer.factorization == "tucker"
    assert layer.implementation == "factorized"
    assert layer.n_layers == 1 and layer.checkpointing is False
    assert all(type(r) is int for r in layer.rank)
    assert layer.bias.shape == (3072,)
    assert layer.weight.to_matrix().shape == (3072, 768)
    assert layer.weight.to_tensor().shape == (8, 16, 24, 8, 8, 12)


def test_repr_reads_like_the_constructor():
    layer = FactorizedLinear(
        (4, 4), (2, 8), bias=False, factorization="blocktt", rank=3, n_layers=2
    )
    assert repr(layer) == (
        "FactorizedLinear(in_tensorized_features=(4, 4), out_tensorized_features=(2, 8), "
        "bias=False, factorization='tt', rank=(1, 2, 3, 1), implementation='factorized', "
        "n_layers=2)"
    )
    rebuilt = eval(repr(layer), {"FactorizedLinear": FactorizedLinear})
    assert rebuilt.rank == layer.rank


def _reference(layer, x, index):
    matrix = layer.weight.to_matrix(index)
    bias = (
        None if layer.bias is None else (layer.bias if layer.n_layers == 1 else layer.bias[index])
    )
    return F.linear(x, matrix, bias)


@given(config=layer_configs(), leading=st.lists(st.integers(0, 3), min_size=1, max_size=2))
def test_factorized_equals_reconstructed_equals_dense(config, leading):
    layer = FactorizedLinear(**config, dtype=torch.float64)
    x = torch.randn(*leading, layer.in_features, dtype=torch.float64, requires_grad=True)
    for index in range(layer.n_layers):
        results = []
        for implementation in ("factorized", "reconstructed", "dense"):
            layer.zero_grad()
            x.grad = None
            if implementation == "dense":
                y = _reference(layer, x, index)
            else:
                layer.implementation = implementation
                y = layer(x, index)
            assert y.shape == (*leading, layer.out_features)
            y.backward(torch.ones_like(y))
            grads = [x.grad] + [
                p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()
            ]
            results.append((y.detach(), [g.clone() for g in grads]))
        for y, grads in results[1:]:
            torch.testing.assert_close(y, results[0][0], rtol=1e-10, atol=1e-12)
            for got, want in zip(grads, results[0][1]):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@given(config=layer_configs())
def test_sub_layers_share_parameters(config):
    layer = FactorizedLinear(**config, dtype=torch.float64)
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    for index in range(layer.n_layers):
        sub = layer[index]
        assert isinstance(sub, SubFactorizedLinear)
        torch.testing.assert_close(sub(x), layer(x, index))
        torch.testing.assert_close(layer.get_linear(index)(x), layer(x, index))
        assert {id(p) for p in sub.parameters()} == {id(p) for p in layer.parameters()}
        linear = sub.to_linear()
        torch.testing.assert_close(linear(x), layer(x, index))


@given(config=layer_configs())
def test_state_dict_round_trip(config):
    layer = FactorizedLinear(**config)
    other = FactorizedLinear(**config)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(4, layer.in_features)
    torch.testing.assert_close(
        other(x, layer.n_layers - 1), layer(x, layer.n_layers - 1), rtol=0, atol=0
    )


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_serialization_round_trips(factorization):
    layer = FactorizedLinear((4, 6), (3, 8), factorization=factorization, rank=0.5, n_layers=2)
    x = torch.randn(5, 24)
    expected = layer(x, 1)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = FactorizedLinear((4, 6), (3, 8), factorization=factorization, rank=0.5, n_layers=2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for clone in (fresh, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(clone(x, 1), expected, rtol=0, atol=0)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_checkpointing_gives_identical_results(factorization):
    torch.manual_seed(1)
    plain = FactorizedLinear((4, 8), (8, 4), factorization=factorization, rank=0.3)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    x = torch.randn(6, 32, requires_grad=True)
    outs = []
    for layer in (plain, checkpointed):
        layer.train()
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_dtypes(dtype, factorization):
    layer = FactorizedLinear((4, 8), (8, 4), factorization=factorization, rank=0.5, dtype=dtype)
    assert all(p.dtype == dtype for p in layer.parameters())
    x = torch.randn(5, 32, dtype=dtype, requires_grad=True)
    for implementation in ("factorized", "reconstructed"):
        layer.implementation = implementation
        y = layer(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        y.sum().backward()
    reference = layer.to(torch.float64)
    tolerance = {
        torch.float32: 1e-5,
        torch.float64: 1e-12,
        torch.float16: 2e-2,
        torch.bfloat16: 8e-2,
    }[dtype]
    expected = reference(x.detach().double())
    torch.testing.assert_close(y.detach().double(), expected, rtol=tolerance, atol=tolerance)


def test_to_moves_parameters_and_keeps_working():
    layer = FactorizedLinear((4, 4), (4, 4), factorization="tt", rank=2)
    x = torch.randn(3, 16)
    y = layer(x)
    layer.to(torch.float64)
    torch.testing.assert_close(layer(x.double()), y.double(), rtol=1e-6, atol=1e-6)


def test_bias_false_and_shapes():
    assert FactorizedLinear((2, 2), (3,), bias=False).bias is None
    assert FactorizedLinear((2, 2), (3,), n_layers=4).bias.shape == (4, 3)


def test_implementation_can_change_and_is_validated():
    layer = FactorizedLinear((2, 2), (2, 2))
    layer.implementation = "Reconstructed"
    assert layer.implementation == "reconstructed"
    with pytest.raises(ValueError, match="implementation='fast' is not known"):
        layer.implementation = "fast"


def test_empty_batch_and_nan_passthrough():
    layer = FactorizedLinear((2, 3), (4,), rank=2)
    assert layer(torch.randn(0, 6)).shape == (0, 4)
    x = torch.randn(2, 6)
    x[0, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"factorization": "parafac2"},
            ValueError,
            "factorization='parafac2' is not known; expected one of",
        ),
        ({"factorization": None}, TypeError, "factorization=None"),
        ({"implementation": "fast"}, ValueError, "implementation='fast' is not known"),
        ({"rank": 0}, ValueError, "rank=0 .*must be >= 1"),
        ({"rank": -1.0}, ValueError, "rank=-1.0 .*> 0"),
        ({"rank": float("nan")}, ValueError, "rank=nan"),
        ({"rank": "full"}, ValueError, "rank='full'"),
        ({"rank": [1, 2], "factorization": "tucker"}, ValueError, "length 4, got length 2"),
        ({"rank": None}, TypeError, "rank=None"),
        ({"n_layers": 0}, ValueError, "n_layers=0"),
        ({"n_layers": 1.5}, TypeError, "n_layers=1.5"),
        ({"in_tensorized_features": ()}, ValueError, r"in_tensorized_features=\(\)"),
        ({"in_tensorized_features": (2, 0)}, ValueError, r"in_tensorized_features=\(2, 0\).*got 0"),
        ({"out_tensorized_features": (2, -3)}, ValueError, "out_tensorized_features"),
        ({"out_tensorized_features": (2.0, 3)}, TypeError, "out_tensorized_features"),
        ({"out_tensorized_features": "23"}, TypeError, "out_tensorized_features"),
        ({"checkpointing": "yes"}, TypeError, "checkpointing="),
        ({"bias": None}, TypeError, "bias="),
        ({"dtype": torch.int64}, TypeError, "floating-point"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    arguments = {"in_tensorized_features": (2, 3), "out_tensorized_features": (2, 2)}
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        FactorizedLinear(**arguments)


def test_bad_input_is_checked_before_allocation(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError):
        FactorizedLinear((2, 3), (2, 2), rank=-1)
    with pytest.raises(ValueError):
        FactorizedLinear((2, 3), (2, 2), factorization="tucker", rank=(1, 2))
    assert calls == []


@pytest.mark.parametrize(
    "x, indices, error, message",
    [
        (
            torch.randn(3, 5),
            0,
            ValueError,
            r"x has shape \(3, 5\).*in_features=6.*last dimension is 5",
        ),
        (torch.randn(()), 0, ValueError, "0-dim"),
        (torch.randn(3, 6, dtype=torch.float64), 0, TypeError, "dtype torch.float64"),
        ([[1.0] * 6], 0, TypeError, "expected a torch.Tensor"),
        (torch.randn(3, 6), 1, ValueError, "indices=1 is out of range: .*n_layers=1"),
        (torch.randn(3, 6), -1, ValueError, "indices=-1 is out of range"),
        (torch.randn(3, 6), 0.0, TypeError, "indices=0.0"),
        (torch.randn(3, 6), True, TypeError, "indices=True"),
    ],
)
def test_bad_forward_arguments(x, indices, error, message):
    layer = FactorizedLinear((2, 3), (2, 2))
    with pytest.raises(error, match=message):
        layer(x, indices)


def test_index_range_with_several_layers():
    layer = FactorizedLinear((2, 3), (2, 2), n_layers=3)
    layer(torch.randn(1, 6), 2)
    with pytest.raises(ValueError, match="valid indices are 0..2"):
        layer[3]
    assert len(layer) == 3


def test_reset_parameters_is_recallable():
    layer = FactorizedLinear((16, 16), (16, 16), factorization="cp", rank=0.2)
    first = layer.weight.to_matrix().detach().clone()
    layer.reset_parameters()
    second = layer.weight.to_matrix().detach()
    assert not torch.equal(first, second)
    std = 1 / math.sqrt(3 * 256)
    assert abs(float(second.std()) / std - 1) < 0.1
    bound = 1 / math.sqrt(256)
    assert float(layer.bias.detach().abs().max()) <= bound


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_per_sample_gradients_with_torch_func(factorization, implementation):
    """``torch.func`` composes with the layer: vmap of grad gives each sample's gradient."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = FactorizedLinear(
        (24, 32), (24, 32), factorization=factorization, rank=0.05, implementation=implementation
    ).double()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(4, 768, dtype=torch.float64)

    def loss(parameters: dict, sample: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, parameters, (sample.unsqueeze(0),)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        expected = torch.autograd.grad(loss(leaves, x[i]), list(leaves.values()))
        for name, value in zip(leaves, expected):
            torch.testing.assert_close(per_sample[name][i], value)


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_second_derivatives_match_a_dense_reference(implementation):
    """Double backward (gradient penalties, Hessian-vector products) through plans whose steps
    use the oriented backward (a Tucker rank under 16 on a large rebuild): equal to the same
    quantities through a plain einsum rebuild."""
    torch.manual_seed(0)
    layer = FactorizedLinear(
        (24, 32), (24, 32), factorization="tucker", rank=(11, 15, 11, 15),
        implementation=implementation,
    ).double()  # fmt: skip
    x = torch.randn(3, 768, dtype=torch.float64)
    params = list(layer.weight.parameters())
    directions = [torch.randn_like(p) for p in params]

    def hessian_vector(forward):
        grads = torch.autograd.grad(forward().pow(2).sum(), params, create_graph=True)
        dot = sum((g * d).sum() for g, d in zip(grads, directions))
        return torch.autograd.grad(dot, params)

    def reference():
        core, *factors = params
        weight = torch.einsum("efgh,ae,bf,cg,dh->abcd", core, *factors).reshape(768, 768)
        return x @ weight.T + layer.bias

    for value, expected in zip(hessian_vector(lambda: layer(x)), hessian_vector(reference)):
        torch.testing.assert_close(value, expected)
