"""Tests for factlin.decompositions.memory and the algorithms' memory estimates."""

from __future__ import annotations

import pickle
import time

import pytest
import torch

from factlin.decompositions import (
    MEMORY_LIMIT_ENV,
    MemoryLimitError,
    available_memory_bytes,
    check_memory,
    cp_als,
    estimate_cp_als_memory,
    estimate_tt_svd_memory,
    estimate_tucker_memory,
    format_bytes,
    memory_limit_bytes,
    tt_matrix_svd,
    tucker,
)

HUGE_SHAPE = (16,) * 6  # a 4096 x 4096 weight tensorized as (16, 16, 16) x (16, 16, 16)


@pytest.fixture(autouse=True)
def _no_env_limit(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)


def test_cp_at_a_huge_rank_is_refused_fast_without_allocating():
    start = time.perf_counter()
    with pytest.raises(MemoryLimitError) as info:  # full ALS asked for: R x R Grams
        cp_als(torch.empty(HUGE_SHAPE, device="meta"), 173_000, block_size=173_000)
    assert time.perf_counter() - start < 0.5
    message = str(info.value)
    assert "cp_als(shape=(16, 16, 16, 16, 16, 16), rank=173000" in message
    assert "TiB of working memory, above the limit of" in message
    assert "Lower the rank" in message
    assert info.value.estimate_bytes > 173_000**2 * 4 * 6  # at least the six R x R Grams
    assert isinstance(info.value, ValueError)


def test_estimate_and_check_alone_refuse_the_same_request():
    estimate = estimate_cp_als_memory(HUGE_SHAPE, 173_000, 4, block_size=173_000)
    assert estimate > 1 << 40
    with pytest.raises(MemoryLimitError, match=r"cp job needs an estimated .* TiB .*Lower"):
        check_memory(estimate, what="cp job", advice="Lower the rank.", limit_bytes=64 << 30)


def test_meta_tensor_that_fits_is_rejected_after_the_check():
    with pytest.raises(ValueError, match=r"meta device: its shape passed the memory check"):
        cp_als(torch.empty(4, 5, device="meta"), 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: tucker(x, (16,) * 6, memory_limit_bytes=1 << 20),
        lambda x: tt_matrix_svd(x, (16,) * 3, (16,) * 3, rel_tol=0.1, memory_limit_bytes=1 << 20),
        lambda x: cp_als(x, 10, memory_limit_bytes=1 << 20),
    ],
    ids=["tucker", "tt", "cp"],
)
def test_every_algorithm_checks_before_allocating(call):
    with pytest.raises(
        MemoryLimitError, match=r"above the limit of 1\.0 MiB \(memory_limit_bytes\)"
    ):
        call(torch.empty(HUGE_SHAPE, device="meta"))


def test_environment_variable_sets_the_default_limit(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1000")
    assert memory_limit_bytes() == (1000, MEMORY_LIMIT_ENV)
    with pytest.raises(MemoryLimitError, match=MEMORY_LIMIT_ENV):
        cp_als(torch.ones(4, 5, 6), 3)
    # an explicit argument wins over the environment
    assert cp_als(torch.ones(4, 5, 6), 3, memory_limit_bytes=1 << 30).rel_error < 1e-3


@pytest.mark.parametrize("value", ["lots", "-5", "0"])
def test_bad_environment_variable(monkeypatch, value):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, value)
    with pytest.raises(ValueError, match=MEMORY_LIMIT_ENV):
        memory_limit_bytes()


@pytest.mark.parametrize(
    ("limit", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("1G", TypeError)]
)
def test_bad_explicit_limit(limit, error):
    with pytest.raises(error, match=r"memory_limit_bytes="):
        check_memory(1, what="x", advice="y", limit_bytes=limit)


def test_default_limit_is_half_the_available_memory():
    available = available_memory_bytes()
    assert isinstance(available, int) and available > 0
    limit, source = memory_limit_bytes()
    assert abs(limit - available // 2) <= available // 50  # memory moves a little meanwhile
    assert "50% of the" in source and "available on cpu" in source
    assert available_memory_bytes("meta") > 0


def test_check_passes_under_the_limit():
    check_memory(10, what="x", advice="y", limit_bytes=10)


def test_error_pickles_with_its_numbers():
    error = MemoryLimitError("too big", 5, 3)
    clone = pickle.loads(pickle.dumps(error))
    assert (str(clone), clone.estimate_bytes, clone.limit_bytes) == ("too big", 5, 3)


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (512, "512 B"),
        (2048, "2.0 KiB"),
        (3 << 20, "3.0 MiB"),
        (5 << 30, "5.0 GiB"),
        (1 << 41, "2.0 TiB"),
    ],
)
def test_format_bytes(n_bytes, text):
    assert format_bytes(n_bytes) == text


def test_estimates_grow_with_rank_and_itemsize():
    shape = (8, 8, 12, 8, 8, 12)
    cp = [estimate_cp_als_memory(shape, r, 4) for r in (10, 100, 1000)]
    assert cp == sorted(cp) and estimate_cp_als_memory(shape, 100, 8) > cp[1]
    tk = [estimate_tucker_memory(shape, (r,) * 6, 4) for r in (2, 4, 8)]
    assert tk == sorted(tk)
    tt = [estimate_tt_svd_memory((8, 8, 12), (8, 8, 12), (1, r, r, 1), 4) for r in (4, 16, 64)]
    assert tt == sorted(tt)
    assert estimate_tt_svd_memory((8, 8, 12), (8, 8, 12), None, 4) >= tt[-1]


def test_estimates_cover_the_tensor_and_grams():
    shape, rank = (8, 8, 12, 8, 8, 12), 1035
    numel = 768 * 768
    assert estimate_cp_als_memory(shape, rank, 4) >= 4 * (2 * numel + 6 * rank * rank)
    assert estimate_tucker_memory(shape, (5, 5, 8, 5, 5, 8), 4) >= 4 * 2 * numel
    assert estimate_tt_svd_memory((8, 8, 12), (8, 8, 12), (1, 40, 40, 1), 4) >= 4 * 2 * numel
