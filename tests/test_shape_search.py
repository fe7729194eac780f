"""Tests for factlin.shape_search: candidates, budget matching, never worse than balanced."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from factlin import get_tensorized_shape
from factlin.factorizations import resolve_rank
from factlin.shape_search import CP_PROXIES, candidate_shapes, choose_tensorized_shape


def low_rank_weight(rows, cols, seed, decay=1.0):
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))[0]
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return (u * s) @ v.T


# --------------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize(("n_in", "n_out"), [(384, 384), (384, 1536), (1536, 384), (96, 60)])
def test_candidates_fold_both_sides_and_start_balanced(factorization, n_in, n_out):
    cands = candidate_shapes(n_in, n_out, 3, factorization=factorization)
    assert cands[0] == get_tensorized_shape(n_in, n_out, 3)
    assert 1 <= len(cands) <= 12 and len(set(cands)) == len(cands)
    for in_shape, out_shape in cands:
        assert math.prod(in_shape) == n_in and math.prod(out_shape) == n_out
        assert len(in_shape) == len(out_shape) == 3 and min(in_shape + out_shape) >= 2
        assert all(type(n) is int for n in in_shape + out_shape)
    lopsided = max(max(i + o) for i, o in cands)
    assert lopsided > max(cands[0][0] + cands[0][1])  # not only balanced foldings


def test_tt_candidates_include_reversed_output_modes():
    cands = candidate_shapes(384, 384, 3, factorization="tt")
    assert any(o == tuple(sorted(o, reverse=True)) and o != tuple(sorted(o)) for _, o in cands)
    assert all(i == tuple(sorted(i)) for i, _ in cands)
    assert all(o == tuple(sorted(o)) for _, o in candidate_shapes(384, 384, 3))  # Tucker


@pytest.mark.parametrize("limit", [1, 3, 5])
def test_max_candidates_bounds_the_list(limit):
    cands = candidate_shapes(384, 1536, 3, factorization="tt", max_candidates=limit)
    assert len(cands) == limit and cands[0] == ((6, 8, 8), (8, 12, 16))


def test_prime_sizes_have_one_candidate():
    assert candidate_shapes(7, 768) == [((7,), (768,))]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_features": 0}, ValueError, r"in_features=0"),
        ({"out_features": 2.5}, TypeError, r"out_features=2\.5"),
        ({"n_modes": True}, TypeError, r"n_modes=True"),
        ({"max_candidates": 0}, ValueError, r"max_candidates=0"),
        ({"factorization": "svd"}, ValueError, r"svd"),
    ],
)
def test_candidate_bad_arguments(kwargs, error, match):
    args = {"in_features": 64, "out_features": 64, **kwargs}
    with pytest.raises(error, match=match):
        candidate_shapes(**args)


# ------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("factorization", ["tucker", "tt"])
def test_search_reports_every_candidate_within_the_budget(factorization):
    w = low_rank_weight(96, 64, seed=0).float()
    in_shape, out_shape, info = choose_tensorized_shape(w, factorization, 0.3, 3)
    _, budget = resolve_rank(factorization, 0.3, *get_tensorized_shape(64, 96, 3))
    assert (info[0]["in_shape"], info[0]["out_shape"]) == get_tensorized_shape(64, 96, 3)
    assert info[0]["params"] == budget
    assert all(c["params"] <= budget for c in info)
    assert sum(c["chosen"] for c in info) == 1
    chosen = next(c for c in info if c["chosen"])
    assert (chosen["in_shape"], chosen["out_shape"]) == (in_shape, out_shape)
    assert chosen["error"] == min(c["error"] for c in info)
    # the reported error is the one from_linear gets with that shape
    from torch import nn

    from factlin import FactorizedLinear

    linear = nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = FactorizedLinear.from_linear(
        linear,
        rank=chosen["rank"],
        factorization=factorization,
        auto_tensorize=False,
        in_tensorized_features=in_shape,
        out_tensorized_features=out_shape,
    )
    assert layer.decomposition_info["rel_error"] == pytest.approx(chosen["error"], rel=1e-4)


@settings(max_examples=12, deadline=None)
@given(
    factorization=st.sampled_from(["tucker", "tt"]),
    sizes=st.sampled_from([(48, 48), (64, 96), (96, 40), (72, 36)]),
    rank=st.sampled_from([0.1, 0.25, 0.5]),
    seed=st.integers(0, 100),
    decay=st.sampled_from([0.0, 0.5, 1.5]),
)
def test_never_worse_than_the_balanced_shape(factorization, sizes, rank, seed, decay):
    n_out, n_in = sizes
    w = low_rank_weight(n_out, n_in, seed, decay).float()
    in_shape, out_shape, info = choose_tensorized_shape(w, factorization, rank, 3)
    balanced = get_tensorized_shape(n_in, n_out, 3)
    from factlin.shape_search import _decomposition_error

    bal_rank, budget = resolve_rank(factorization, rank, *balanced)
    bal_error, _ = _decomposition_error(w, factorization, *balanced, bal_rank, {})
    chosen = next(c for c in info if c["chosen"])
    assert chosen["error"] <= bal_error + 1e-6
    assert chosen["params"] <= budget


def test_error_fn_is_used_for_every_candidate():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    calls = []

    def error_fn(in_shape, out_shape, rank):
        calls.append((in_shape, out_shape, rank))
        return float(max(in_shape + out_shape)), 123  # prefers the most balanced

    in_shape, out_shape, info = choose_tensorized_shape(w, "tt", 0.2, 3, error_fn=error_fn)
    assert len(calls) == len(info) == len(candidate_shapes(48, 64, 3, factorization="tt"))
    assert [(c["in_shape"], c["out_shape"]) for c in info] == [c[:2] for c in calls]
    assert all(c["params"] == 123 for c in info)
    assert max(in_shape + out_shape) == min(max(c[0] + c[1]) for c in calls)


@pytest.mark.parametrize("bad", [None, (float("nan"), 1), 0.5, ("x", 1)])
def test_error_fn_bad_results_are_reported(bad):
    w = torch.randn(16, 16)
    with pytest.raises(TypeError, match="error_fn"):
        choose_tensorized_shape(w, "tucker", 0.5, 2, error_fn=lambda i, o, r: bad)


@pytest.mark.parametrize("proxy", CP_PROXIES)
def test_cp_proxies(proxy):
    w = low_rank_weight(36, 48, seed=4).float()
    in_shape, out_shape, info = choose_tensorized_shape(w, "cp", 0.3, 2, cp_proxy=proxy)
    assert math.prod(in_shape) == 48 and math.prod(out_shape) == 36
    if proxy == "balanced":
        assert len(info) == 1 and (in_shape, out_shape) == get_tensorized_shape(48, 36, 2)
    else:
        assert len(info) > 1
    assert (proxy == "full") == ("proxy" not in info[0])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([[1.0]], "tt", 0.5), {}, TypeError, r"weight_2d=.*expected a 2-D"),
        ((torch.ones(2, 3, 4), "tt", 0.5), {}, ValueError, r"shape \(2, 3, 4\)"),
        ((torch.ones(4, 4, dtype=torch.int64), "tt", 0.5), {}, ValueError, r"int64"),
        ((torch.ones(4, 4), "nope", 0.5), {}, ValueError, r"nope"),
        ((torch.ones(4, 4), "tt", 0.5), {"error_fn": 3}, TypeError, r"error_fn=3"),
        ((torch.ones(4, 4), "cp", 0.5), {"cp_proxy": "cheap"}, ValueError, r"cp_proxy='cheap'"),
        ((torch.ones(4, 4), "tt", 0.5), {"decomposition_kwargs": 1}, TypeError, r"dict"),
    ],
)
def test_search_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        choose_tensorized_shape(*args, **kwargs)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 100), rank=st.sampled_from([0.2, 0.4]))
def test_cp_search_is_never_worse_than_balanced(seed, rank):
    from factlin.shape_search import _decomposition_error

    w = low_rank_weight(48, 36, seed, decay=1.0).float()
    in_shape, out_shape, info = choose_tensorized_shape(w, "cp", rank, 2)
    chosen = next(c for c in info if c["chosen"])
    balanced = get_tensorized_shape(36, 48, 2)
    bal_rank, _ = resolve_rank("cp", rank, *balanced)
    bal_error, _ = _decomposition_error(w, "cp", *balanced, bal_rank, {})
    if "full_error" in chosen:  # the proxy's pick was checked against balanced by full fits
        assert "full_error" in info[0] and chosen["full_error"] <= info[0]["full_error"]
        assert info[0]["full_error"] == pytest.approx(bal_error, rel=1e-6)
    else:  # the proxy itself preferred the balanced shape
        assert (in_shape, out_shape) == balanced
