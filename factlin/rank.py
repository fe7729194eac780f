"""The rank solver: turn a user's ``rank`` into concrete ranks for a factorization.

A ``rank`` is one of

* ``'same'``: as many parameters as the dense weight;
* a float ``f > 0``: ``f`` times the dense parameter count (``f > 1`` is allowed);
* an int: the CP rank, the same rank on every Tucker mode, or the same bond rank on every
  tensor-train bond;
* a tuple of ints: one Tucker rank per mode, or the tensor-train bond ranks (with or without the
  two boundary 1s).

Ranks are always capped at what is meaningful (a Tucker rank never exceeds its mode size nor the
product of the other ranks; a TT bond never exceeds the rank its unfoldings can have), so a target
above the exact representation yields the exact one and a target below the all-ones
representation yields the all-ones one. In between, parameter-count targets are met by a search
over ranks followed by a greedy per-mode refinement, which lands within a few percent of the
target except where a single rank step is itself larger than that.

All functions are pure and work on plain Python ints.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

from ._typing import RankSpec, Shape
from .errors import RankError, describe

__all__ = [
    "validate_rank",
    "target_param_count",
    "count_cp_params",
    "count_tucker_params",
    "count_tt_params",
    "max_cp_rank",
    "max_tucker_ranks",
    "max_tt_ranks",
    "resolve_cp_rank",
    "resolve_tucker_ranks",
    "resolve_tt_ranks",
]

_RANK_STRINGS = ("same",)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def validate_rank(rank: object) -> RankSpec:
    """Check the type and range of a ``rank`` argument and return it normalized.

    Returns ``'same'``, a Python float, a Python int or a tuple of Python ints.

    Raises
    ------
    TypeError
        If ``rank`` is not a str, real number or sequence of ints.
    RankError
        (a ``ValueError``) if it is an unknown string, a non-positive, NaN or infinite number, or
        a sequence with a non-positive entry.
    """
    if isinstance(rank, str):
        key = rank.strip().lower()
        if key not in _RANK_STRINGS:
            raise RankError(
                f"rank={describe(rank)} is not a known rank name; expected 'same', a float "
                "fraction of the dense parameter count, an int or a tuple of ints"
            )
        return key
    if isinstance(rank, bool):
        raise TypeError(
            f"rank={describe(rank)}: expected 'same', a float, an int or a tuple of ints, "
            "not a bool"
        )
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise RankError(f"rank={describe(rank)}: an integer rank must be >= 1")
        return int(rank)
    if isinstance(rank, numbers.Real):
        value = float(rank)
        if not math.isfinite(value) or value <= 0:
            raise RankError(
                f"rank={describe(rank)}: a float rank is a fraction of the dense parameter count "
                "and must be finite and > 0"
            )
        return value
    if isinstance(rank, (tuple, list)):
        ranks = []
        for entry in rank:
            if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
                raise TypeError(
                    f"rank={describe(rank)}: every entry of a rank tuple must be an int, "
                    f"got {describe(entry)}"
                )
            if entry < 1:
                raise RankError(f"rank={describe(rank)}: every entry of a rank tuple must be >= 1")
            ranks.append(int(entry))
        if not ranks:
            raise RankError(f"rank={describe(rank)}: a rank tuple must not be empty")
        return tuple(ranks)
    raise TypeError(
        f"rank={describe(rank)}: expected 'same', a float fraction of the dense parameter count, "
        "an int or a tuple of ints"
    )


def target_param_count(rank: str | float, dense_count: int) -> float:
    """Number of parameters asked for by ``'same'`` or a float fraction of ``dense_count``."""
    if rank == "same":
        return float(dense_count)
    return float(rank) * dense_count


# --------------------------------------------------------------------------------------------
# Closed-form parameter counts and caps
# --------------------------------------------------------------------------------------------
def count_cp_params(shape: Shape, rank: int) -> int:
    """Parameters of a CP tensor: ``rank`` weights plus one ``(n_k, rank)`` factor per mode."""
    return rank * (1 + sum(shape))


def count_tucker_params(shape: Shape, ranks: Sequence[int]) -> int:
    """Parameters of a Tucker tensor: the core ``prod(ranks)`` plus factors ``sum(n_k * r_k)``."""
    return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks))


def count_tt_params(pair_sizes: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of a TT-matrix with cores ``(r_{k-1}, out_k, in_k, r_k)``.

    ``pair_sizes[k]`` is ``out_k * in_k``.

    ``ranks`` includes the two boundary 1s (length ``len(pair_sizes) + 1``).
    """
    return sum(ranks[k] * size * ranks[k + 1] for k, size in enumerate(pair_sizes))


def max_cp_rank(shape: Shape) -> int:
    """Largest useful CP rank: any tensor has CP rank at most ``prod(shape) / max(shape)``."""
    return max(1, math.prod(shape) // max(shape))


def max_tucker_ranks(shape: Shape) -> tuple[int, ...]:
    """Full multilinear ranks: ``r_k = min(n_k, prod of the other modes)``."""
    total = math.prod(shape)
    return tuple(max(1, min(n, total // n)) for n in shape)


def max_tt_ranks(pair_sizes: Sequence[int]) -> tuple[int, ...]:
    """Full TT bond ranks (with boundary 1s): ``min(prod of sizes left, prod of sizes right)``."""
    ranks = [1]
    for k in range(1, len(pair_sizes)):
        ranks.append(min(math.prod(pair_sizes[:k]), math.prod(pair_sizes[k:])))
    ranks.append(1)
    return tuple(ranks)


def _project_tucker(ranks: Sequence[int], caps: Sequence[int]) -> tuple[int, ...]:
    """Clip Tucker ranks to their caps and to ``r_k <= prod_{j != k} r_j`` (a fixed point)."""
    ranks = [max(1, min(r, c)) for r, c in zip(ranks, caps)]
    changed = len(ranks) > 1
    while changed:
        changed = False
        total = math.prod(ranks)
        for k, r in enumerate(ranks):
            others = total // r
            if r > others:
                ranks[k] = others
                total = math.prod(ranks)
                changed = True
    return tuple(ranks)


def _project_tt(bonds: Sequence[int], pair_sizes: Sequence[int]) -> tuple[int, ...]:
    """Clip TT ranks (with boundaries) so every bond is reachable from its neighbours."""
    caps = max_tt_ranks(pair_sizes)
    ranks = [max(1, min(r, c)) for r, c in zip(bonds, caps)]
    ranks[0] = ranks[-1] = 1
    changed = True
    while changed:
        changed = False
        for k in range(1, len(ranks) - 1):
            limit = min(ranks[k - 1] * pair_sizes[k - 1], ranks[k + 1] * pair_sizes[k])
            if ranks[k] > limit:
                ranks[k] = limit
                changed = True
    return tuple(ranks)


# --------------------------------------------------------------------------------------------
# Searching for a parameter-count target
# --------------------------------------------------------------------------------------------
def _closest_uniform(
    target: float, make: Callable[[float], tuple[int, ...]], count: Callable[..., int]
) -> tuple[int, ...]:
    """Bisect a scale ``alpha`` in [0, 1] so ``count(make(alpha))`` is closest to ``target``."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if count(make(mid)) < target:
            low = mid
        else:
            high = mid
    below, above = make(low), make(high)
    return min((below, above), key=lambda r: abs(count(r) - target))


def _refine_greedily(
    ranks: tuple[int, ...],
    target: float,
    count: Callable[[tuple[int, ...]], int],
    project: Callable[[Sequence[int]], tuple[int, ...]],
    movable: Sequence[int],
) -> tuple[int, ...]:
    """Move one rank by one at a time while that brings the parameter count closer to target."""
    best, best_gap = ranks, abs(count(ranks) - target)
    for _ in range(64 * max(1, len(movable))):
        candidates = []
        for k in movable:
            for step in (1, -1):
                trial = list(best)
                trial[k] += step
                candidates.append(project(trial))
        trial = min(candidates, key=lambda r: abs(count(r) - target))
        gap = abs(count(trial) - target)
        if gap >= best_gap:
            break
        best, best_gap = trial, gap
    return best


# --------------------------------------------------------------------------------------------
# Resolvers
# --------------------------------------------------------------------------------------------
def resolve_cp_rank(rank: RankSpec, shape: Shape) -> int:
    """Concrete CP rank for a tensor of ``shape``.

    Examples
    --------
    >>> resolve_cp_rank('same', (8, 8, 12, 8, 8, 12))
    10347
    >>> resolve_cp_rank(16, (4, 4))
    4
    """
    rank = validate_rank(rank)
    cap = max_cp_rank(shape)
    if isinstance(rank, tuple):
        if len(rank) != 1:
            raise RankError(
                f"rank={rank!r}: the CP factorization takes a single rank (an int), "
                f"got a tuple of length {len(rank)}"
            )
        rank = rank[0]
    if isinstance(rank, int):
        return min(rank, cap)
    target = target_param_count(rank, math.prod(shape))
    return max(1, round(min(cap, target / (1 + sum(shape)))))


def resolve_tucker_ranks(rank: RankSpec, shape: Shape) -> tuple[int, ...]:
    """Concrete Tucker ranks (one per mode) for a tensor of ``shape``.

    A tuple must have one entry per mode of ``shape``.
    """
    rank = validate_rank(rank)
    caps = max_tucker_ranks(shape)

    def project(ranks: Sequence[int]) -> tuple[int, ...]:
        return _project_tucker(ranks, caps)

    if isinstance(rank, tuple):
        if len(rank) != len(shape):
            raise RankError(
                f"rank={rank!r}: a Tucker rank tuple needs one rank per mode of the tensorized "
                f"weight {tuple(shape)}, i.e. length {len(shape)}, got length {len(rank)}"
            )
        return project(rank)
    if isinstance(rank, int):
        return project([rank] * len(shape))

    target = target_param_count(rank, math.prod(shape))

    def count(ranks: tuple[int, ...]) -> int:
        return count_tucker_params(shape, ranks)

    if target >= count(caps):
        return caps

    def make(alpha: float) -> tuple[int, ...]:
        return project([round(alpha * c) for c in caps])

    uniform = _closest_uniform(target, make, count)
    return _refine_greedily(uniform, target, count, project, range(len(shape)))


def resolve_tt_ranks(rank: RankSpec, pair_sizes: Sequence[int]) -> tuple[int, ...]:
    """Concrete TT-matrix bond ranks, boundary 1s included (length ``len(pair_sizes) + 1``).

    ``pair_sizes[k]`` is ``out_k * in_k`` for core ``k``. A tuple may list the inner bonds only
    (length ``len(pair_sizes) - 1``) or include the two boundary 1s.
    """
    rank = validate_rank(rank)
    n_cores = len(pair_sizes)
    caps = max_tt_ranks(pair_sizes)

    def project(ranks: Sequence[int]) -> tuple[int, ...]:
        return _project_tt(ranks, pair_sizes)

    if isinstance(rank, tuple):
        if len(rank) == n_cores + 1:
            if rank[0] != 1 or rank[-1] != 1:
                raise RankError(
                    f"rank={rank!r}: TT ranks given with boundaries must start and end with 1"
                )
            return project(rank)
        if len(rank) == n_cores - 1:
            return project((1, *rank, 1))
        raise RankError(
            f"rank={rank!r}: a TT rank tuple needs {n_cores - 1} bond ranks for {n_cores} cores "
            f"(or {n_cores + 1} with the boundary 1s), got length {len(rank)}"
        )
    if isinstance(rank, int):
        return project([1] + [rank] * (n_cores - 1) + [1])

    target = target_param_count(rank, math.prod(pair_sizes))

    def count(ranks: tuple[int, ...]) -> int:
        return count_tt_params(pair_sizes, ranks)

    if target >= count(caps) or n_cores == 1:
        return caps
    largest = max(caps)

    def make(alpha: float) -> tuple[int, ...]:
        return project([1] + [round(alpha * largest)] * (n_cores - 1) + [1])

    uniform = _closest_uniform(target, make, count)
    return _refine_greedily(uniform, target, count, project, range(1, n_cores))
