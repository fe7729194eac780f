"""Round trips of FactorizedLinear (state_dict, torch.save, deepcopy, pickle) and the errors of
loading a state_dict saved from a differently configured layer (factlin._state_dict_check)."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from conftest import FACTORIZATIONS
from torch import nn

from factlin import FactorizedLinear, ShapeError
from factlin._state_dict_check import METADATA_KEY, StateDictMismatchError

IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")
SHAPES = {"in_tensorized_features": (2, 3), "out_tensorized_features": (3, 2)}


def _layer(factorization: str, n_layers: int = 1, **kwargs) -> FactorizedLinear:
    arguments = {**SHAPES, "factorization": factorization, "rank": 0.5, "n_layers": n_layers}
    arguments.update(kwargs)
    return FactorizedLinear(**arguments, dtype=torch.float64)


def _through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _outputs(layer: FactorizedLinear, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer index, with autograd and without (the inference-cache path)."""
    outputs = [layer(x, index) for index in range(layer.n_layers)]
    with torch.no_grad():
        outputs += [layer(x, index) for index in range(layer.n_layers)]
    return outputs


def _assert_identical(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_round_trips_give_identical_outputs(factorization, n_layers, implementation):
    torch.manual_seed(1)
    layer = _layer(factorization, n_layers, implementation=implementation)
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = _outputs(layer, x)  # also fills the source's inference cache
    assert implementation != "reconstructed" or len(layer._weight_cache) > 0

    torch.manual_seed(2)  # the fresh layers start from other values
    loaded = _layer(factorization, n_layers, implementation=implementation)
    loaded.load_state_dict(layer.state_dict())
    saved = _layer(factorization, n_layers, implementation=implementation)
    saved.load_state_dict(_through_torch_save(layer.state_dict()))
    clones = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
    for clone in clones:
        assert len(clone._weight_cache) == 0  # the cache is never copied
        assert clone.implementation == implementation and clone.rank == layer.rank
    for other in (loaded, saved, *clones):
        _assert_identical(_outputs(other, x), expected)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_loading_refreshes_a_filled_inference_cache(factorization):
    source = _layer(factorization, implementation="reconstructed")
    target = _layer(factorization, implementation="reconstructed")
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        target(x)  # cache the old matrix
        target.load_state_dict(source.state_dict())
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
        target.load_state_dict(source.state_dict(), assign=True)
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_state_dict_of_a_model_round_trips_through_torch_save():
    def model() -> nn.Sequential:
        return nn.Sequential(
            _layer("tucker", n_layers=2).get_linear(1), nn.ReLU(), _layer("tt"), _layer("cp")
        )

    source, target = model(), model()
    x = torch.randn(3, 6, dtype=torch.float64)
    target.load_state_dict(_through_torch_save(source.state_dict()))
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_metadata_records_the_configuration_as_plain_values():
    layer = _layer("tucker", n_layers=2)
    metadata = layer.state_dict()._metadata[""][METADATA_KEY]
    assert metadata == {
        "factorization": "tucker",
        "rank": layer.rank,
        "in_tensorized_features": (2, 3),
        "out_tensorized_features": (3, 2),
        "n_layers": 2,
    }
    assert all(type(r) is int for r in metadata["rank"])
    assert _through_torch_save(layer.state_dict())._metadata[""][METADATA_KEY] == metadata


def test_tt_ranks_reduced_by_a_tolerance_need_those_ranks_to_load():
    linear = nn.Linear(6, 6, dtype=torch.float64)
    with torch.no_grad():  # a Kronecker product has TT-matrix rank one
        linear.weight.copy_(torch.kron(torch.randn(3, 2), torch.randn(2, 3)))
    layer = FactorizedLinear.from_linear(
        linear,
        factorization="tt",
        auto_tensorize=False,
        in_tensorized_features=(2, 3),
        out_tensorized_features=(3, 2),
        decomposition_kwargs={"rel_tol": 1e-6},
    )
    assert layer.rank == (1, 1, 1)
    rebuilt = FactorizedLinear((2, 3), (3, 2), factorization="tt", rank="same", dtype=torch.float64)
    with pytest.raises(
        StateDictMismatchError, match=r"saved from a 'tt' layer with rank \(1, 1, 1\)"
    ):
        rebuilt.load_state_dict(layer.state_dict())
    exact = FactorizedLinear(
        (2, 3),
        (3, 2),
        factorization="tt",
        rank=layer.rank,
        implementation="reconstructed",
        dtype=torch.float64,
    )
    exact.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(exact(x), layer(x), rtol=0, atol=0)


# ---- mismatched configurations -------------------------------------------------------------
MISMATCHES = [
    pytest.param(
        {"factorization": "tucker"},
        {"factorization": "tt"},
        r"saved from a 'tucker' layer with rank \(.*\).*but this layer is a 'tt' layer with "
        r"rank \(1, .*\).*differ in factorization, rank",
        id="factorization",
    ),
    pytest.param(
        {"factorization": "cp", "rank": 4},
        {"factorization": "cp", "rank": 2},
        r"saved from a 'cp' layer with rank 4.*this layer is a 'cp' layer with rank 2.*"
        r"differ in rank\.",
        id="cp-rank",
    ),
    pytest.param(
        {"factorization": "tt", "rank": 3},
        {"factorization": "tt", "rank": 2},
        r"rank \(1, 3, 1\).*rank \(1, 2, 1\).*differ in rank",
        id="tt-rank",
    ),
    pytest.param(
        {"factorization": "tucker", "in_tensorized_features": (3, 2)},
        {"factorization": "tucker"},
        r"in_tensorized_features=\(3, 2\).*in_tensorized_features=\(2, 3\).*"
        r"differ in .*in_tensorized_features",
        id="shapes",
    ),
    pytest.param(
        {"factorization": "cp", "rank": 2, "in_tensorized_features": (6,)},
        {"factorization": "cp", "rank": 2, "in_tensorized_features": (2, 3)},
        r"differ in .*in_tensorized_features",
        id="modes",
    ),
    pytest.param(
        {"factorization": "tt", "rank": 2, "n_layers": 3},
        {"factorization": "tt", "rank": 2, "n_layers": 2},
        r"n_layers=3.*n_layers=2.*differ in n_layers",
        id="n_layers",
    ),
]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("saved, target, message", MISMATCHES)
def test_mismatched_state_dict_names_both_configurations(saved, target, message, strict):
    source = _layer(**{"factorization": "cp", **saved})
    layer = _layer(**{"factorization": "cp", **target})
    before = [p.detach().clone() for p in layer.parameters()]
    for state in (source.state_dict(), _through_torch_save(source.state_dict())):
        with pytest.raises(StateDictMismatchError, match=message) as info:
            layer.load_state_dict(state, strict=strict)
        assert isinstance(info.value, ShapeError) and isinstance(info.value, ValueError)
    for p, q in zip(layer.parameters(), before):  # nothing was loaded
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("saved, target, message", MISMATCHES)
def test_mismatch_without_metadata_is_inferred_from_the_tensors(saved, target, message):
    source = _layer(**{"factorization": "cp", **saved})
    layer = _layer(**{"factorization": "cp", **target})
    plain = dict(source.state_dict())  # no _metadata
    if source.state_dict().keys() == layer.state_dict().keys() and all(
        plain[k].shape == v.shape for k, v in layer.state_dict().items()
    ):
        layer.load_state_dict(plain)  # indistinguishable from the tensors alone
        return
    factorization = source.factorization
    with pytest.raises(
        StateDictMismatchError,
        match=rf"state_dict holds a '{factorization}' weight with rank .*but this layer is a "
        rf"'{layer.factorization}' layer",
    ):
        layer.load_state_dict(plain)


def test_mismatch_inside_a_model_names_the_module():
    source = nn.Sequential(nn.Identity(), _layer("tucker"))
    target = nn.Sequential(nn.Identity(), _layer("cp"))
    with pytest.raises(StateDictMismatchError, match=r"state_dict \(at '1'\) was saved from a "):
        target.load_state_dict(source.state_dict())
    with pytest.raises(StateDictMismatchError, match=r"\(at '1'\) holds a 'tucker' weight"):
        target.load_state_dict(OrderedDict(source.state_dict().items()))


def test_strict_false_keeps_its_meaning():
    source, layer = _layer("tt", rank=2), _layer("tt", rank=2)
    x = torch.randn(2, 6, dtype=torch.float64)
    # No entry for this layer at all: strict=False loads nothing and reports missing keys.
    result = layer.load_state_dict({}, strict=False)
    assert set(result.missing_keys) == set(layer.state_dict())
    # A partial state_dict of the same configuration: what is there is loaded.
    state = source.state_dict()
    del state["bias"]
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == []
    with torch.no_grad():
        layer.bias.copy_(source.bias)
    torch.testing.assert_close(layer(x), source(x), rtol=0, atol=0)
    # Same configuration with and without bias: torch's usual missing/unexpected keys.
    no_bias = _layer("tt", rank=2, bias=False)
    result = no_bias.load_state_dict(source.state_dict(), strict=False)
    assert result.unexpected_keys == ["bias"]
    with pytest.raises(RuntimeError, match="Unexpected key"):
        no_bias.load_state_dict(source.state_dict())


def test_unknown_tensors_are_reported():
    layer = _layer("cp", rank=2)
    state = {"weight.mystery": torch.zeros(3), "bias": torch.zeros(6, dtype=torch.float64)}
    with pytest.raises(StateDictMismatchError, match="match no known factorization"):
        layer.load_state_dict(state)
