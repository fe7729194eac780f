"""What tltorch code meets in factlin: the weight's tensor API (shape, tensorized_shape,
normal_, decomposition, calling and indexing), the layer attributes tltorch defines, tltorch
checkpoints (factlin.tltorch_compat), mismatch messages, and tltorch's other names."""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import pytest
import torch
from conftest import FACTORIZATIONS
from hypothesis import given
from strategies import layer_configs
from torch import nn

import factlin
from factlin import FactorizedLinear, RankError, convert_tltorch_state_dict
from factlin._state_dict_check import StateDictMismatchError
from factlin.tltorch_compat import TLTORCH_ONLY_NAMES, tltorch_layout

SHAPES = {"in_tensorized_features": (2, 3, 4), "out_tensorized_features": (3, 2, 2)}


def _layer(factorization: str, n_layers: int = 1, **kwargs) -> FactorizedLinear:
    arguments = {**SHAPES, "factorization": factorization, "rank": 0.5, "n_layers": n_layers}
    arguments.update(kwargs)
    return FactorizedLinear(**arguments, dtype=torch.float64)


def _tltorch_state_dict(layer: FactorizedLinear, prefix: str = "") -> OrderedDict:
    """``layer``'s tensors under tltorch's key names (FactorList entries ``factor_<k>``), as a
    tltorch ``FactorizedLinear`` of the same configuration saves them; no metadata."""
    state: OrderedDict = OrderedDict()
    weight = layer.weight
    if layer.factorization == "cp":
        state[prefix + "weight.weights"] = weight.weights.detach().clone()
    if layer.factorization == "tucker":
        state[prefix + "weight.core"] = weight.core.detach().clone()
    tensors = weight.cores if layer.factorization == "tt" else weight.factors
    for k, tensor in enumerate(tensors):
        state[f"{prefix}weight.factors.factor_{k}"] = tensor.detach().clone()
    if layer.bias is not None:
        state[prefix + "bias"] = layer.bias.detach().clone()
    return state


# ---- the weight's tensor API ---------------------------------------------------------------
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_weight_shapes_are_tltorchs(factorization, n_layers):
    weight = _layer(factorization, n_layers).weight
    layers = (3,) if n_layers > 1 else ()
    # tltorch's TensorizedTensor: shape is the matrix's, tensorized_shape the nested one
    assert weight.shape == (*layers, 12, 24)
    assert weight.tensorized_shape == (*layers, (3, 2, 2), (2, 3, 4))
    assert weight.ndim == weight.dim() == len(weight.shape)
    assert weight.size() == weight.shape and weight.size(-1) == 24
    assert weight.numel() == math.prod(weight.shape)
    assert all(type(n) is int for n in weight.shape)


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_calling_and_indexing_the_weight_give_the_dense_matrix(factorization, n_layers):
    weight = _layer(factorization, n_layers).weight
    matrix = weight.to_matrix()
    torch.testing.assert_close(weight(), matrix)
    assert weight().shape == weight.shape
    torch.testing.assert_close(weight[1:3], matrix[1:3])
    if n_layers > 1:
        for i in range(n_layers):
            torch.testing.assert_close(weight(i), weight.to_matrix(i))
            torch.testing.assert_close(weight[i], matrix[i])
        torch.testing.assert_close(weight[-1], matrix[-1])
        with pytest.raises(IndexError, match="n_layers=3"):
            weight[3]
    else:
        torch.testing.assert_close(weight[5], matrix[5])
        torch.testing.assert_close(weight[2, 7], matrix[2, 7])


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_decomposition_is_tensorlys_order_and_the_parameters_themselves(factorization, n_layers):
    weight = _layer(factorization, n_layers).weight
    decomposition = weight.decomposition
    full = weight.to_tensor()
    if factorization == "cp":
        weights, factors = decomposition
        assert weights is weight.weights and all(f is g for f, g in zip(factors, weight.factors))
        letters = "abcdefgh"[: len(factors)]
        equation = "r," + ",".join(c + "r" for c in letters) + "->" + letters
        rebuilt = torch.einsum(equation, weights, *factors)
    elif factorization == "tucker":
        core, factors = decomposition
        assert core is weight.core and all(f is g for f, g in zip(factors, weight.factors))
        rebuilt = core
        for factor in factors:  # mode products, the contracted mode rotating to the back
            rebuilt = torch.tensordot(rebuilt, factor, dims=([0], [1]))
    else:
        cores = decomposition
        assert all(c is d for c, d in zip(cores, weight.cores))
        rebuilt = cores[0]
        for core in cores[1:]:  # (1, O.., I.., r) x (r, o, i, r') -> (1, O..o, I..i, r')
            rebuilt = torch.einsum("aOIr,rois->aOoIis", rebuilt, core).reshape(
                1, rebuilt.shape[1] * core.shape[1], rebuilt.shape[2] * core.shape[2], -1
            )
        rebuilt = rebuilt.reshape(weight.shape)
        full = weight.to_matrix()
    torch.testing.assert_close(rebuilt.reshape(full.shape), full)


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("mean, std", [(0.0, 0.02), (0.5, 0.1), (-2.0, 3.0)])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_normal_gives_the_rebuilt_tensor_that_mean_and_std(factorization, mean, std, n_layers):
    # a sizable layer (768 -> 1536): the statistics are those of ~1.2M entries per layer
    layer = FactorizedLinear(
        (8, 8, 12), (8, 16, 12), factorization=factorization, rank=0.1, n_layers=n_layers,
        dtype=torch.float64,
    )  # fmt: skip
    torch.manual_seed(0)
    assert layer.weight.normal_(mean, std) is layer.weight
    with torch.no_grad():
        tensor = layer.weight.to_tensor()
    assert abs(float(tensor.mean()) - mean) <= 1e-3 * std + 1e-9 * abs(mean)
    assert float(tensor.std()) == pytest.approx(std, rel=0.03)
    if mean == 0:  # reset_parameters: every layer on its own too
        for i in range(n_layers):
            assert float(tensor.reshape(n_layers, -1)[i].std()) == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_normal_defaults_and_keeps_outputs_consistent(factorization):
    layer = _layer(factorization, implementation="reconstructed")
    x = torch.randn(4, 24, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)  # fills the inference cache
        layer.weight.normal_()
        after = layer(x)
    assert not torch.equal(before, after)  # the cache saw the in-place re-draw
    torch.testing.assert_close(after, x @ layer.weight.to_matrix().T + layer.bias)
    assert float(layer.weight.to_tensor().detach().std()) == pytest.approx(1.0, rel=0.2)


@pytest.mark.parametrize(
    "mean, std, error, message",
    [
        ("0", 1.0, TypeError, r"mean='0' \(type str\): expected a real number"),
        (0.0, None, TypeError, "std=None"),
        (True, 1.0, TypeError, "mean=True"),
        (0.0, -1.0, ValueError, r"std=-1.0: expected a standard deviation >= 0"),
        (float("nan"), 1.0, ValueError, "mean=nan: expected a finite number"),
        (0.0, float("inf"), ValueError, "std=inf"),
    ],
)
def test_normal_rejects_bad_arguments_before_touching_the_parameters(mean, std, error, message):
    weight = _layer("tucker").weight
    before = [p.detach().clone() for p in weight.parameters()]
    with pytest.raises(error, match=message):
        weight.normal_(mean, std)
    for p, q in zip(weight.parameters(), before):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize(
    "factorization, rank, message",
    [("cp", 1, "CP weight of rank 1"), ("tt", 1, r"TT weight with bonds \(1, 1, 1, 1\)")],
)
def test_a_mean_needs_room_in_the_ranks(factorization, rank, message):
    weight = _layer(factorization, rank=rank).weight
    with pytest.raises(RankError, match=message):
        weight.normal_(1.0, 0.1)
    weight.normal_(0.0, 0.1)  # a zero mean needs no extra term


def test_normal_is_a_no_op_on_the_meta_device():
    layer = FactorizedLinear((2, 3), (3, 2), factorization="cp", rank=2, device="meta")
    assert layer.weight.normal_(0.5, 1.0) is layer.weight


# ---- layer attributes ----------------------------------------------------------------------
@pytest.mark.parametrize("rank", ["same", 0.3, 3])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_layer_attributes_are_tltorchs(factorization, rank):
    layer = _layer(factorization, rank=rank)
    assert layer.tensorized_shape == (3, 2, 2, 2, 3, 4)  # out + in, as tltorch
    assert layer.weight_shape == (12, 24)
    assert layer.input_rank == rank and layer.rank == layer.weight.rank
    assert layer.has_bias is True
    assert _layer(factorization, rank=rank, bias=False).has_bias is False
    joint = _layer(factorization, n_layers=3, rank=rank)
    assert joint.has_bias == (True, True, True) and joint.tensorized_shape == layer.tensorized_shape
    assert joint.weight_shape == (12, 24)


@given(layer_configs())
def test_layer_attributes_agree_with_the_configuration(config):
    layer = FactorizedLinear(**config)
    assert layer.tensorized_shape == (
        config["out_tensorized_features"] + config["in_tensorized_features"]
    )
    assert layer.weight_shape == (layer.out_features, layer.in_features)
    assert layer.weight.shape[-2:] == layer.weight_shape
    assert layer.input_rank == config["rank"]
    assert layer.has_bias == (config["bias"] if config["n_layers"] == 1 else
                              (config["bias"],) * config["n_layers"])  # fmt: skip


# ---- tltorch checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_a_tltorch_state_dict_loads_and_gives_the_same_outputs(factorization, n_layers):
    if factorization == "tt" and n_layers > 1:
        pytest.skip("tltorch's BlockTT of several layers has another layout (tested below)")
    torch.manual_seed(0)
    source = _layer(factorization, n_layers)
    state = _tltorch_state_dict(source)
    assert tltorch_layout(state) == factorization
    torch.manual_seed(1)
    target = _layer(factorization, n_layers)
    result = target.load_state_dict(state)  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(5, 24, dtype=torch.float64)
    for i in range(n_layers):
        torch.testing.assert_close(target(x, i), source(x, i), rtol=0, atol=0)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_convert_tltorch_state_dict_maps_a_whole_model(factorization):
    torch.manual_seed(0)
    source = nn.Sequential(_layer(factorization), nn.ReLU(), nn.Linear(12, 2, dtype=torch.float64))
    state = _tltorch_state_dict(source[0], prefix="0.")
    state["2.weight"] = source[2].weight.detach()
    state["2.bias"] = source[2].bias.detach()
    converted = convert_tltorch_state_dict(state)
    assert set(converted) == set(source.state_dict())
    assert list(converted)[-2:] == ["2.weight", "2.bias"]  # order kept
    assert converted["2.weight"] is state["2.weight"]  # tensors not copied
    target = nn.Sequential(_layer(factorization), nn.ReLU(), nn.Linear(12, 2, dtype=torch.float64))
    target.load_state_dict(converted)
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    # a parent's load_state_dict maps the layers' keys itself
    again = nn.Sequential(_layer(factorization), nn.ReLU(), nn.Linear(12, 2, dtype=torch.float64))
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), source(x), rtol=0, atol=0)
    assert convert_tltorch_state_dict(converted) == converted  # factlin keys stay


def test_convert_tltorch_state_dict_rejects_what_is_not_a_state_dict():
    with pytest.raises(TypeError, match="state_dict of type list"):
        convert_tltorch_state_dict([1, 2])


def test_a_tltorch_blocktt_of_several_layers_is_refused_clearly():
    # tltorch's BlockTT with n_layers: 5-way cores (r, n_layers, out_k, in_k, r')
    state = {
        "weight.factors.factor_0": torch.zeros(1, 2, 3, 2, 4),
        "weight.factors.factor_1": torch.zeros(4, 2, 4, 6, 1),
    }
    with pytest.raises(StateDictMismatchError, match="tltorch BlockTT weight of several layers"):
        convert_tltorch_state_dict(state)
    layer = FactorizedLinear((2, 6), (3, 4), factorization="tt", n_layers=2)
    with pytest.raises(StateDictMismatchError, match="5-way cores"):
        layer.load_state_dict(state)


@pytest.mark.parametrize("strict", [True, False])
def test_a_real_mismatch_from_tltorch_still_fails_naming_what_differs(strict):
    source = _layer("cp", rank=20)
    target = _layer("cp", rank=10)
    with pytest.raises(StateDictMismatchError) as info:
        target.load_state_dict(_tltorch_state_dict(source), strict=strict)
    message = str(info.value)
    assert "tltorch's key layout" in message
    assert "'cp' weight with rank 20" in message and "layer with rank 10" in message
    assert message.count("rank") == 3 and "differ in rank." in message  # and nothing else
    assert "tensor modes" not in message and "n_layers" not in message


def test_a_tltorch_state_of_another_factorization_says_so():
    source = _layer("tucker")
    target = _layer("cp")
    with pytest.raises(StateDictMismatchError, match=r"tltorch's key layout\) holds a 'tucker'"):
        target.load_state_dict(_tltorch_state_dict(source))


# ---- mismatch messages -----------------------------------------------------------------------
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_a_rank_mismatch_names_the_rank_and_nothing_else(factorization):
    source = _layer(factorization, rank=0.8)
    target = _layer(factorization, rank=0.3)
    assert source.rank != target.rank
    plain = dict(source.state_dict())  # no metadata: inferred from the tensors
    with pytest.raises(StateDictMismatchError) as info:
        target.load_state_dict(plain)
    message = str(info.value)
    assert f"rank {source.rank!r}" in message and f"rank {target.rank!r}" in message
    assert "differ in rank." in message
    assert "modes" not in message and "tensorized shape" not in message
    # with metadata: the same (the configuration fields that differ, and only those)
    with pytest.raises(StateDictMismatchError) as info:
        target.load_state_dict(source.state_dict())
    message = str(info.value)
    assert "differ in rank." in message and "tensorized_features" not in message


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_a_shape_mismatch_names_the_shapes(factorization):
    source = _layer(factorization, rank=2, in_tensorized_features=(4, 3, 2))
    target = _layer(factorization, rank=2)
    with pytest.raises(StateDictMismatchError) as info:
        target.load_state_dict(dict(source.state_dict()))
    message = str(info.value)
    assert "tensorized shape" in message
    if factorization == "tt":
        assert "in-modes (4, 3, 2)" in message and "in-modes (2, 3, 4)" in message
    else:
        assert "(3, 2, 2, 4, 3, 2)" in message and "(3, 2, 2, 2, 3, 4)" in message
    assert not re.search(r"rank (\S+).*but.*rank \1", message)


# ---- the rest of tltorch's namespace ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TLTORCH_ONLY_NAMES))
def test_tltorch_only_names_raise_a_clear_attribute_error(name):
    with pytest.raises(AttributeError, match=rf"tltorch\.{name} has no factlin counterpart.*"
                       r"FactorizedLinear and its tools.*Coming from tltorch"):  # fmt: skip
        getattr(factlin, name)
    assert not hasattr(factlin, name)


def test_other_missing_names_keep_the_usual_error():
    with pytest.raises(AttributeError, match=r"^module 'factlin' has no attribute 'nope'$"):
        factlin.nope  # noqa: B018
    with pytest.raises(ImportError):
        from factlin import FactorizedEmbedding  # noqa: F401
    assert "convert_tltorch_state_dict" in factlin.__all__


# ---- against real tltorch (the bench extra) --------------------------------------------------
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_against_real_tltorch(factorization):
    tltorch = pytest.importorskip("tltorch")
    name = {"cp": "cp", "tucker": "tucker", "tt": "blocktt"}[factorization]
    torch.manual_seed(0)
    reference = tltorch.FactorizedLinear(
        (2, 3, 4), (3, 2, 2), factorization=name, rank=0.5, bias=True
    ).double()
    layer = FactorizedLinear(
        (2, 3, 4), (3, 2, 2), factorization=factorization, rank=reference.weight.rank,
        dtype=torch.float64,
    )  # fmt: skip
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-10, atol=1e-10)
    assert tuple(int(n) for n in reference.weight.shape) == layer.weight.shape
    assert layer.tensorized_shape == tuple(reference.tensorized_shape)
    assert layer.weight_shape == tuple(int(n) for n in reference.weight_shape)
