"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

import math

from hypothesis import strategies as st

FACTORIZATION_NAMES = ("cp", "tucker", "tt")


def tensorized_shapes(
    min_modes: int = 1, max_modes: int = 4, max_size: int = 5
) -> st.SearchStrategy:
    """Tuples of 1..4 small mode sizes."""
    return st.lists(st.integers(1, max_size), min_size=min_modes, max_size=max_modes).map(tuple)


@st.composite
def layer_configs(draw: st.DrawFn, max_features: int = 256) -> dict:
    """Keyword arguments of a small valid FactorizedLinear."""
    in_shape = draw(tensorized_shapes())
    out_shape = draw(tensorized_shapes())
    while math.prod(in_shape) * math.prod(out_shape) > max_features * 16:
        in_shape = in_shape[:-1] or (2,)
        out_shape = out_shape[:-1] or (2,)
    factorization = draw(st.sampled_from(FACTORIZATION_NAMES))
    rank = draw(ranks_for(factorization, in_shape, out_shape))
    return {
        "in_tensorized_features": in_shape,
        "out_tensorized_features": out_shape,
        "factorization": factorization,
        "rank": rank,
        "n_layers": draw(st.integers(1, 3)),
        "bias": draw(st.booleans()),
    }


def ranks_for(factorization: str, in_shape: tuple, out_shape: tuple) -> st.SearchStrategy:
    """Valid rank specifications: 'same', fractions, ints."""
    return st.one_of(
        st.just("same"),
        st.floats(0.01, 2.0, allow_nan=False, allow_infinity=False),
        st.integers(1, 12),
    )


# ---- fuzzing: valid and invalid arguments mixed (tests/test_fuzz.py) --------------------------
def _random_case(name: str) -> st.SearchStrategy:
    """``name`` with each letter in either case, sometimes padded with spaces."""
    flags = st.lists(st.booleans(), min_size=len(name), max_size=len(name))
    cased = flags.map(lambda up: "".join(c.upper() if u else c for c, u in zip(name, up)))
    return st.tuples(st.sampled_from(["", " "]), cased, st.sampled_from(["", " ", "\t"])).map(
        "".join
    )


#: Things no argument accepts.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=4),
    st.binary(max_size=2),
    st.complex_numbers(max_magnitude=4, allow_nan=False, allow_infinity=False),
    st.just(object()),
    st.just({"a": 1}),
    st.just({1, 2}),
)


def fuzz_tensorized_features() -> st.SearchStrategy:
    """Small valid shapes (tuples, lists, plain ints) and invalid ones."""
    entries = st.one_of(
        st.integers(-2, 4), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=1)
    )
    return st.one_of(
        tensorized_shapes(max_modes=3, max_size=4),
        tensorized_shapes(max_modes=3, max_size=4).map(list),
        st.integers(-2, 5),
        st.just(()),
        st.lists(entries, min_size=1, max_size=3).map(tuple),
        junk,
    )


def fuzz_factorizations() -> st.SearchStrategy:
    """Valid names and aliases in random case, and junk."""
    names = ("cp", "tucker", "tt", "blocktt", "ttm", "tt-matrix", "parafac")
    return st.one_of(
        st.sampled_from(names).flatmap(_random_case),
        st.sampled_from(["cpd", "tensor-train", "tuck", "", "c p", "tt\x00"]),
        st.integers(-1, 3),
        junk,
    )


def fuzz_ranks() -> st.SearchStrategy:
    """Valid rank specifications and invalid ones: zero, negative, NaN, inf, huge, strings,
    wrong-length tuples, tuples of junk, bools, None."""
    entries = st.one_of(
        st.integers(-2, 6), st.integers(10**6, 10**20), st.floats(-2, 6), st.booleans(), st.none()
    )
    return st.one_of(
        _random_case("same"),
        st.sampled_from(["full", "", "0.5", "1", "same!", "nan"]),
        st.integers(-3, 12),
        st.integers(10**6, 10**30),
        st.floats(),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.fractions(min_value=-1, max_value=3, max_denominator=7),
        st.lists(entries, min_size=0, max_size=9).map(tuple),
        st.lists(st.integers(1, 5), min_size=0, max_size=9),
        junk,
    )


def fuzz_n_layers() -> st.SearchStrategy:
    """Small and huge-ish counts, zero, negatives, floats, bools, strings."""
    return st.one_of(
        st.integers(1, 4),
        st.integers(-3, 0),
        st.integers(100, 3000),
        st.floats(allow_nan=True),
        st.sampled_from([1.0, 2.0, "2"]),
        junk,
    )


def fuzz_implementations() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(("factorized", "reconstructed", "auto")).flatmap(_random_case),
        st.sampled_from(["fast", "dense", ""]),
        junk,
    )


def fuzz_layer_indices(n_layers: int) -> st.SearchStrategy:
    """Indices for a layer with ``n_layers`` layers, valid and invalid."""
    return st.one_of(
        st.integers(0, n_layers - 1),
        st.integers(-3, -1),
        st.integers(n_layers, n_layers + 3),
        st.floats(allow_nan=True),
        st.just(0.0),
        junk,
    )


def mostly(valid: st.SearchStrategy, other: st.SearchStrategy, odds: int = 9) -> st.SearchStrategy:
    """Draws from ``valid`` about ``odds`` times as often as from ``other``."""
    return st.integers(0, odds).flatmap(lambda k: other if k == 0 else valid)


def valid_ranks() -> st.SearchStrategy:
    """Rank specifications every factorization accepts, huge ones included (they are capped)."""
    return st.one_of(
        _random_case("same"),
        st.floats(0.01, 3.0),
        st.integers(1, 12),
        st.integers(10**6, 10**30),
        st.floats(1e3, 1e300),
    )


def valid_factorization_names() -> st.SearchStrategy:
    """Registered names and aliases, in random case, sometimes padded."""
    names = ("cp", "tucker", "tt", "blocktt", "ttm", "tt-matrix", "parafac")
    return st.sampled_from(names).flatmap(_random_case)


def rank_tuples_for(
    factorization: str, in_shape: tuple, out_shape: tuple, n_layers: int
) -> st.SearchStrategy:
    """Per-mode (Tucker) or per-bond (TT, with or without boundary 1s) rank tuples of the right
    length, entries possibly above their caps; a 1-tuple for CP."""
    layer_modes = 1 if n_layers > 1 else 0
    entries = st.one_of(st.integers(1, 6), st.integers(10**6, 10**12))
    if factorization == "cp":
        return st.tuples(entries)
    if factorization == "tucker":
        length = layer_modes + len(in_shape) + len(out_shape)
        return st.lists(entries, min_size=length, max_size=length).map(tuple)
    bonds = layer_modes + max(len(in_shape), len(out_shape)) - 1
    inner = st.lists(entries, min_size=bonds, max_size=bonds).map(tuple)
    with_boundaries = inner.map(lambda r: (1, *r, 1))
    return st.one_of(inner, with_boundaries) if bonds else with_boundaries  # () is no rank


# ---- calibration (tests/test_input_stats.py, tests/test_calibrated.py) -----------------------
@st.composite
def input_batches(draw: st.DrawFn, min_batches: int = 1, max_batches: int = 4) -> list:
    """A few float32 or float64 batches ``(*, in_features)`` of one layer's inputs, each with
    its own leading shape (possibly empty), offset and scale."""
    import torch  # tests only: strategies stay importable without building tensors

    in_features = draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(draw(st.integers(min_batches, max_batches))):
        lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple))
        scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
        offset = draw(st.sampled_from([0.0, 5.0]))
        x = torch.randn(*lead, in_features, generator=generator, dtype=dtype) * scale + offset
        batches.append(x)
    return batches
