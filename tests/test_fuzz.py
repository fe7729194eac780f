"""Fuzzing the public entry points with valid and invalid arguments mixed.

The contract: every call either succeeds, and the layer then gives finite outputs of the right
shape for every valid index, or raises ValueError/TypeError (factlin's own subclasses included)
with a message. No other exception type escapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, example, given
from hypothesis import strategies as st
from strategies import (
    fuzz_factorizations,
    fuzz_implementations,
    fuzz_layer_indices,
    fuzz_n_layers,
    fuzz_ranks,
    fuzz_tensorized_features,
    junk,
    mostly,
    rank_tuples_for,
    tensorized_shapes,
    valid_factorization_names,
    valid_ranks,
)
from torch import nn

from factlin import FactorizedLinear
from factlin.factorizations import normalize_factorization

#: Above this many weight entries a drawn layer is not built (the fuzz is about arguments).
_MAX_DENSE = 4096


def _expect_clean_error(call):
    """``call()``'s result, or None when it raised ValueError/TypeError with a message."""
    try:
        result = call()
    except (ValueError, TypeError) as error:
        assert str(error).strip(), f"{type(error).__name__} raised with an empty message"
        event(f"raised {type(error).__name__}: {str(error).split('=')[0][:20]}")
        return None
    event("succeeded")
    return result


def _indices_to_check(n_layers: int) -> list[int]:
    if n_layers <= 4:
        return list(range(n_layers))
    return [0, n_layers // 2, n_layers - 1]


def _assert_works(layer: FactorizedLinear, batch: int) -> None:
    dtype = layer.weight_reference.dtype
    x = torch.randn(batch, layer.in_features, dtype=dtype)
    for implementation in ("factorized", "reconstructed", "auto"):
        layer.implementation = implementation
        for index in _indices_to_check(layer.n_layers):
            y = layer(x, index)
            assert y.shape == (batch, layer.out_features) and y.dtype == dtype
            assert torch.isfinite(y).all(), (implementation, index)


def _small_enough(in_shape: object, out_shape: object, n_layers: object) -> bool:
    """Skip valid-looking shapes whose dense weight is large (allocation is not the point)."""
    sizes = []
    for shape in (in_shape, out_shape):
        entries = shape if isinstance(shape, (tuple, list)) else (shape,)
        sizes += [e for e in entries if isinstance(e, int) and not isinstance(e, bool) and e > 0]
    layers = n_layers if isinstance(n_layers, int) and n_layers > 0 else 1
    return math.prod(sizes) * min(layers, 16) <= _MAX_DENSE


@given(
    data=st.data(),
    in_shape=tensorized_shapes(max_modes=3, max_size=3),
    out_shape=tensorized_shapes(max_modes=3, max_size=3),
    factorization=valid_factorization_names(),
    n_layers=st.one_of(st.integers(1, 3), st.integers(100, 2000)),
    implementation=st.sampled_from(("factorized", "reconstructed", "auto")).map(str.upper),
    bias=st.booleans(),
    dtype=st.sampled_from([None, torch.float32, torch.float64]),
    batch=st.integers(0, 3),
)
def test_valid_arguments_always_build(
    data, in_shape, out_shape, factorization, n_layers, implementation, bias, dtype, batch
):
    canonical = normalize_factorization(factorization)
    rank = data.draw(
        st.one_of(valid_ranks(), rank_tuples_for(canonical, in_shape, out_shape, n_layers)),
        label="rank",
    )
    layer = FactorizedLinear(
        in_shape,
        out_shape,
        bias=bias,
        factorization=factorization,
        rank=rank,
        implementation=implementation,
        n_layers=n_layers,
        dtype=dtype,
    )
    assert layer.factorization == canonical and layer.n_layers == n_layers
    assert layer.implementation == implementation.lower()
    _assert_works(layer, batch)


@given(  # each argument is valid most of the time, so that about half the layers get built
    in_shape=mostly(tensorized_shapes(max_modes=3, max_size=4), fuzz_tensorized_features()),
    out_shape=mostly(tensorized_shapes(max_modes=3, max_size=4), fuzz_tensorized_features()),
    factorization=mostly(st.sampled_from(["cp", "tucker", "tt"]), fuzz_factorizations(), 3),
    rank=mostly(valid_ranks(), fuzz_ranks(), 2),
    n_layers=mostly(st.integers(1, 3), fuzz_n_layers(), 3),
    implementation=mostly(st.just("factorized"), fuzz_implementations(), 3),
    bias=mostly(st.booleans(), junk),
    dtype=mostly(
        st.sampled_from([None, torch.float32, torch.float64]),
        st.one_of(st.sampled_from([torch.int32, torch.complex64, "float32"]), junk),
    ),
    batch=st.integers(0, 3),
)
@example(  # every entry point of the rank solver at its caps
    in_shape=(2, 3),
    out_shape=(3, 2),
    factorization="Tucker",
    rank=10**30,
    n_layers=2,
    implementation="AUTO",
    bias=True,
    dtype=None,
    batch=2,
)
@example(
    in_shape=3,
    out_shape=[1, 1],
    factorization=" blockTT ",
    rank=(1,),
    n_layers=3000,
    implementation="factorized",
    bias=False,
    dtype=torch.float64,
    batch=1,
)
def test_constructor_fuzz(
    in_shape, out_shape, factorization, rank, n_layers, implementation, bias, dtype, batch
):
    if not _small_enough(in_shape, out_shape, n_layers):
        event("skipped: large")
        return
    layer = _expect_clean_error(
        lambda: FactorizedLinear(
            in_shape,
            out_shape,
            bias=bias,
            factorization=factorization,
            rank=rank,
            implementation=implementation,
            n_layers=n_layers,
            dtype=dtype,
        )
    )
    if layer is None:
        return
    assert type(layer.in_features) is int and type(layer.out_features) is int
    assert type(layer.n_layers) is int and layer.factorization in ("cp", "tucker", "tt")
    ranks = layer.rank if isinstance(layer.rank, tuple) else (layer.rank,)
    assert all(type(r) is int and r >= 1 for r in ranks)
    _assert_works(layer, batch)


@given(data=st.data(), n_layers=st.integers(1, 4), factorization=st.sampled_from(["cp", "tt"]))
def test_forward_index_fuzz(data, n_layers, factorization):
    layer = FactorizedLinear((2, 2), (3,), factorization=factorization, rank=2, n_layers=n_layers)
    x = torch.randn(2, 4)
    for _ in range(5):
        index = data.draw(fuzz_layer_indices(n_layers))
        y = _expect_clean_error(lambda: layer(x, index))  # noqa: B023 (called at once)
        valid = isinstance(index, int) and not isinstance(index, bool) and 0 <= index < n_layers
        assert (y is not None) == valid, index
        if valid:
            assert y.shape == (2, 3) and torch.isfinite(y).all()
            torch.testing.assert_close(y, layer(x, torch.tensor(index)), rtol=0, atol=0)
            assert _expect_clean_error(lambda: layer[index]) is not None  # noqa: B023


@given(
    x=st.one_of(
        st.tuples(st.integers(0, 2), st.integers(0, 6)).map(lambda s: torch.randn(*s)),
        st.just(torch.randn(())),
        st.just(torch.randn(3, 6, dtype=torch.float64)),
        st.just(torch.ones(3, 6, dtype=torch.int64)),
        st.just(torch.ones(3, 6, dtype=torch.bool)),
        st.just(torch.randn(3, 6, dtype=torch.complex64)),
        st.just([[0.0] * 6]),
        junk,
    )
)
def test_forward_input_fuzz(x):
    layer = FactorizedLinear((2, 3), (2,), factorization="tucker", rank=2)
    y = _expect_clean_error(lambda: layer(x))
    if y is not None:
        assert y.shape == (*x.shape[:-1], 2) and torch.isfinite(y).all()


# ---- from_linear ---------------------------------------------------------------------------
_SIZES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13])


def _weight(kind: str, out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(out_features * 31 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    if kind == "zeros":
        weight.zero_()
    elif kind == "rank one":
        weight = torch.outer(weight[:, 0], torch.linspace(-1, 1, in_features, dtype=torch.float64))
    elif kind == "constant":
        weight.fill_(0.25)
    elif kind == "tiny":
        weight.mul_(1e-20)
    elif kind == "large":
        weight.mul_(1e8)
    elif kind in ("nan", "inf", "-inf"):
        weight[out_features // 2, in_features // 2] = float(kind)
    return weight.to(dtype)


@given(
    out_features=_SIZES,
    in_features=_SIZES,
    kind=st.sampled_from(
        ["random", "zeros", "rank one", "constant", "tiny", "large", "nan", "inf", "-inf"]
    ),
    factorization=st.sampled_from(["cp", "tucker", "tt"]).flatmap(
        lambda name: st.sampled_from([name, name.upper(), name.title()])
    ),
    rank=st.one_of(st.just("same"), st.integers(1, 4), st.floats(0.05, 1.5)),
    n_tensorized_modes=st.integers(1, 4),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    batch=st.integers(0, 3),
)
@example(  # N x 1, prime
    out_features=13,
    in_features=1,
    kind="random",
    factorization="cp",
    rank="same",
    n_tensorized_modes=3,
    bias=True,
    dtype=torch.float32,
    batch=2,
)
@example(  # 1 x N, zero weights
    out_features=1,
    in_features=11,
    kind="zeros",
    factorization="tucker",
    rank=2,
    n_tensorized_modes=2,
    bias=False,
    dtype=torch.float64,
    batch=1,
)
@example(
    out_features=7,
    in_features=13,
    kind="rank one",
    factorization="tt",
    rank=0.5,
    n_tensorized_modes=3,
    bias=True,
    dtype=torch.float32,
    batch=3,
)
def test_from_linear_fuzz(
    out_features, in_features, kind, factorization, rank, n_tensorized_modes, bias, dtype, batch
):
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(_weight(kind, out_features, in_features, dtype))
    kwargs = {"n_iter_max": 10, "random_state": 0} if factorization.lower() == "cp" else None

    def make() -> FactorizedLinear:
        return FactorizedLinear.from_linear(
            linear,
            rank=rank,
            factorization=factorization,
            n_tensorized_modes=n_tensorized_modes,
            decomposition_kwargs=kwargs,
        )

    if kind in ("nan", "inf", "-inf"):
        with pytest.raises(ValueError, match="NaN or inf"):
            make()
        return
    event(f"{factorization.lower()}, {kind}")
    layer = make()  # everything finite must work
    assert (layer.in_features, layer.out_features) == (in_features, out_features)
    assert math.isfinite(layer.decomposition_info["rel_error"])
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    _assert_works(layer, batch)
    if kind == "zeros":
        torch.testing.assert_close(layer.weight.to_matrix(), linear.weight.detach())


@given(
    linear=mostly(
        st.just(nn.Linear(4, 6)),
        st.sampled_from([nn.Conv1d(2, 3, 1), nn.ReLU(), torch.randn(3, 4), None, "linear"]),
        3,
    ),
    rank=mostly(valid_ranks(), fuzz_ranks(), 3),
    factorization=mostly(valid_factorization_names(), fuzz_factorizations(), 3),
    auto_tensorize=mostly(st.just(True), st.one_of(st.just(False), junk), 3),
    n_tensorized_modes=mostly(st.integers(1, 4), st.one_of(st.integers(-1, 0), junk), 3),
    in_shape=mostly(st.none(), st.one_of(st.just((2, 2)), fuzz_tensorized_features()), 3),
    out_shape=mostly(st.none(), st.one_of(st.just((3, 2)), fuzz_tensorized_features()), 3),
    kwargs=st.sampled_from(  # always few sweeps: CP-ALS is slow (None is tested elsewhere)
        [
            {"n_iter_max": 3},
            {"n_iter_max": 3},
            {"n_iter_max": -1},
            {"n_iter_max": 3, "tol": math.nan},
            {"n_iter_max": 3, "bogus": 1},
            {"n_iter_max": 3, "init": "junk"},
            [("n_iter_max", 3)],
        ]
    ),
)
def test_from_linear_argument_fuzz(
    linear, rank, factorization, auto_tensorize, n_tensorized_modes, in_shape, out_shape, kwargs
):
    if not _small_enough(in_shape, out_shape, 1):
        return
    layer = _expect_clean_error(
        lambda: FactorizedLinear.from_linear(
            linear,
            rank=rank,
            auto_tensorize=auto_tensorize,
            n_tensorized_modes=n_tensorized_modes,
            in_tensorized_features=in_shape,
            out_tensorized_features=out_shape,
            factorization=factorization,
            decomposition_kwargs=kwargs,
        )
    )
    if layer is not None:
        _assert_works(layer, 2)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_huge_float_rank_is_capped(factorization):
    layer = FactorizedLinear((2, 3), (3, 2), factorization=factorization, rank=1e308)
    full = FactorizedLinear((2, 3), (3, 2), factorization=factorization, rank=10**9)
    assert layer.rank == full.rank
