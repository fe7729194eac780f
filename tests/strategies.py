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
