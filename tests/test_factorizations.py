"""Tests for factlin.factorizations: the shared interface, against plain references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import ranks_for, tensorized_shapes

from factlin.factorizations import (
    ALIASES,
    FACTORIZATIONS,
    CPWeight,
    TuckerWeight,
    get_factorization,
    normalize_factorization,
)


def reference_tensor(weight) -> torch.Tensor:
    """The full tensor rebuilt naively (loops over ranks / mode products / core chain)."""
    if isinstance(weight, CPWeight):
        full = torch.zeros(weight.tensor_shape, dtype=torch.float64)
        for r in range(weight.rank):
            term = weight.weights[r].double()
            for factor in weight.factors:
                term = torch.tensordot(term, factor[:, r].double(), dims=0)
            full += term
        return full
    if isinstance(weight, TuckerWeight):
        full = weight.core.double()
        for k, factor in enumerate(weight.factors):
            # mode-k product: contract the core's mode k with the factor's columns
            full = torch.movedim(torch.tensordot(factor.double(), full, dims=([1], [k])), 0, k)
        return full
    cores = [c.double() for c in weight.cores]
    outs = [c.shape[1] for c in cores]
    ins = [c.shape[2] for c in cores]
    chain = cores[0]  # (1, o..., i..., r) built up core by core
    for core in cores[1:]:
        chain = torch.einsum("a...b,bcde->a...cde", chain, core)
    d = len(cores)
    chain = chain.reshape([o_i for pair in zip(outs, ins) for o_i in pair])  # o1 i1 o2 i2 ...
    chain = chain.permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    shape = weight.tensor_shape
    return chain.reshape(shape)


def make(factorization, in_shape, out_shape, rank, n_layers=1, dtype=torch.float64):
    weight = get_factorization(factorization)(in_shape, out_shape, rank, n_layers, dtype=dtype)
    weight.reset_parameters(0.1)
    return weight


@st.composite
def weights(draw):
    in_shape = draw(tensorized_shapes(1, 3, 4))
    out_shape = draw(tensorized_shapes(1, 3, 4))
    factorization = draw(st.sampled_from(sorted(FACTORIZATIONS)))
    rank = draw(ranks_for(factorization, in_shape, out_shape))
    n_layers = draw(st.integers(1, 3))
    return make(factorization, in_shape, out_shape, rank, n_layers)


@given(weight=weights())
def test_to_tensor_matches_reference(weight):
    torch.testing.assert_close(weight.to_tensor(), reference_tensor(weight), rtol=1e-12, atol=1e-14)


@given(weight=weights())
def test_parameter_count_closed_form(weight):
    expected = type(weight).count_params(
        weight.in_shape, weight.out_shape, weight.rank, weight.n_layers
    )
    assert weight.num_parameters() == expected


@given(weight=weights(), batch=st.integers(0, 9))
def test_contract_matches_matrix(weight, batch):
    x = torch.randn(batch, weight.in_features, dtype=torch.float64)
    for layer in range(weight.n_layers):
        matrix = weight.to_matrix(layer)
        assert matrix.shape == (weight.out_features, weight.in_features)
        expected = x @ matrix.T
        torch.testing.assert_close(weight.contract(x, layer), expected, rtol=1e-10, atol=1e-12)


@given(weight=weights())
def test_operand_shapes_are_known_without_the_tensors(weight):
    """Planning reads operand shapes from ranks and shapes alone (no tensor touched)."""
    for selected in (False, True) if weight.n_layers > 1 else (False,):
        operands = weight._operands(0 if selected else None)
        assert weight._operand_shapes(selected) == [tuple(t.shape) for t in operands]


@given(weight=weights())
def test_layer_slices_of_full_matrix(weight):
    full = weight.to_matrix()
    if weight.n_layers == 1:
        assert full.shape == (weight.out_features, weight.in_features)
        return
    assert full.shape == (weight.n_layers, weight.out_features, weight.in_features)
    for layer in range(weight.n_layers):
        torch.testing.assert_close(full[layer], weight.to_matrix(layer), rtol=1e-12, atol=1e-14)


def test_parameters_are_plain_parameters():
    for name in FACTORIZATIONS:
        weight = make(name, (2, 3), (4, 2), 2)
        params = list(weight.parameters())
        assert params and all(type(p) is torch.nn.Parameter for p in params)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("CP", "cp"),
        ("Tucker", "tucker"),
        ("TT", "tt"),
        ("BlockTT", "tt"),
        ("ttm", "tt"),
        (" cp ", "cp"),
    ],
)
def test_names_and_aliases(name, expected):
    assert normalize_factorization(name) == expected


def test_unknown_name_lists_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"factorization='tensor-ring' is not known; expected one of \['cp', 'tt', 'tucker'\]",
    ):
        normalize_factorization("tensor-ring")
    with pytest.raises(TypeError, match="factorization=3"):
        normalize_factorization(3)
    assert set(ALIASES.values()) <= set(FACTORIZATIONS)


@pytest.mark.parametrize("factorization", sorted(FACTORIZATIONS))
@pytest.mark.parametrize("rank", ["same", 0.5, 0.1, 0.01, 1, 2, 7])
@pytest.mark.parametrize(
    "shapes", [((4, 8, 8), (8, 4, 8)), ((16, 16), (16, 16)), ((8, 8, 12), (8, 16, 24))]
)
def test_reset_parameters_matches_linear_init(factorization, rank, shapes):
    """Rebuilt weight: mean 0 and std 1/sqrt(3 in) within 10%, like nn.Linear's default."""
    in_shape, out_shape = shapes
    in_features = math.prod(in_shape)
    std = 1 / math.sqrt(3 * in_features)
    weight = get_factorization(factorization)(in_shape, out_shape, rank, 1)
    weight.reset_parameters(std)
    matrix = weight.to_matrix().detach().double()
    assert abs(float(matrix.std()) / std - 1) < 0.10
    assert abs(float(matrix.mean())) < 0.05 * std


@pytest.mark.parametrize("factorization", sorted(FACTORIZATIONS))
def test_reset_parameters_per_layer(factorization):
    std = 0.02
    weight = get_factorization(factorization)((8, 8, 4), (4, 8, 8), 0.1, 3)
    weight.reset_parameters(std)
    for layer in range(3):
        matrix = weight.to_matrix(layer).detach().double()
        assert abs(float(matrix.std()) / std - 1) < 0.10


def test_tt_pads_unequal_mode_counts():
    weight = make("tt", (4, 4, 4), (8, 8), 3)
    assert [tuple(c.shape[1:3]) for c in weight.cores] == [(8, 4), (8, 4), (1, 4)]
    torch.testing.assert_close(weight.to_tensor(), reference_tensor(weight).reshape(8, 8, 4, 4, 4))


def test_too_many_modes_is_a_clear_error():
    with pytest.raises(ValueError, match="einsum indices"):
        make("tucker", (2,) * 14, (2,) * 14, 1)
