"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares.

The MTTKRP of every mode is computed from one of two half-contractions: the modes are split into
a left group and a right group of balanced sizes, the tensor is viewed as the matrix
``X (prod left, prod right)``, and one GEMM with the Khatri-Rao product of the *other* group's
factors (``prod right × R`` or ``prod left × R``, never ``prod(shape) × R``) gives a partial
tensor from which each mode of the group is a cheap contraction. Two GEMMs per sweep instead of
one per mode, and the usual Gauss-Seidel order is kept because a group's partial only involves
the other group's factors.

**Ranks above the mode sizes** (R in the thousands for tensorized weights at useful budgets): a
sweep's least-squares solves then dominate, ``N`` Cholesky factorizations of ``R × R`` Hadamard
products of Grams, ``N R^3 / 3`` flops and ``O(N^2 R^2)`` memory traffic (70% of a sweep at
``R = 1638`` on a 384×384 weight). Above :func:`auto_block_size` the components are split into
blocks of ``b`` columns and one sweep updates the blocks in turn, each by an ALS sweep over all
modes against the residual ``E = X - X_hat`` with the block added back (block-coordinate ALS):
solves cost ``N R b^2 / 3``, Grams are ``b × b``, and the GEMMs (two MTTKRPs, two residual
updates per block) ``8 numel R`` per sweep. Measured on the MiniLM weights, a blocked sweep
lowers the error as much as a full one (0.6769 against 0.6778 after 20 sweeps at R = 819).

**Extrapolation** between sweeps (a line search in the sense of Bro 1998, with an adaptive
step): after sweep ``t`` the factors move to ``A_t + s (A_t - A_{t-1})`` when that lowers the
exact error, ``s`` growing after a success and shrinking after a failure. One extra
reconstruction GEMM per sweep; it halves the sweeps to a given error on the MiniLM weights.

References
----------
.. [1] T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3),
   2009, §3.4 (CP-ALS).
.. [2] A.-H. Phan, P. Tichavský and A. Cichocki, "Fast Alternating LS Algorithms for High Order
   CANDECOMP/PARAFAC Tensor Factorizations", IEEE Trans. Signal Processing 61(19), 2013
   (partial MTTKRPs shared between modes).
.. [3] R. Bro, "Multi-way Analysis in the Food Industry", PhD thesis, University of Amsterdam,
   1998, §4.3 (extrapolation between ALS sweeps).
.. [4] M. Rajih, P. Comon and R. A. Harshman, "Enhanced Line Search: A Novel Method to Accelerate
   PARAFAC", SIAM J. Matrix Anal. Appl. 30(3), 2008.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional

import torch

from ..errors import describe
from ._linalg import (
    RandomState,
    check_callback,
    check_choice,
    check_finite,
    check_nonnegative_int,
    check_positive_int,
    check_tensor,
    check_tol,
    khatri_rao,
    left_singular_vectors,
    make_generator,
    randn,
    reject_meta,
    relative_error,
    spd_solve_right,
    sq_norm,
    unfold,
    working_dtype,
)
from .budget import check_seconds, check_time, flops_per_second, format_seconds
from .memory import check_memory

__all__ = [
    "CPDecomposition",
    "auto_block_size",
    "cp_als",
    "cp_to_tensor",
    "estimate_cp_als_memory",
    "estimate_cp_als_seconds",
]

_LOGGER = logging.getLogger("factlin")

#: Below ``_EXACT_ERROR_FACTOR * sqrt(eps)`` the cheap error estimate is replaced by the exact
#: error (one rebuild of the tensor), because cancellation in ``||X||^2 - 2<X, X_hat> +
#: ||X_hat||^2`` leaves little more than rounding noise there.
_EXACT_ERROR_FACTOR = 30.0

#: Sweeps stop once the exact error is at rounding level, ``_EXACT_FIT_FACTOR * eps``.
_EXACT_FIT_FACTOR = 10.0

#: Default ``tol``: relative improvement of the error per sweep below which sweeps stop. On the
#: MiniLM weights plain ALS still gains ~1e-4 per sweep after 100 sweeps; with extrapolation,
#: stopping at 3e-4 ends 0.002-0.004 above the 100-sweep error after 27-35 sweeps (1e-3: +0.008,
#: 5e-4: +0.004-0.006, 1e-4: below it after 41-60 sweeps; benchmarks/README.md).
DEFAULT_TOL = 3e-4

#: Extrapolation step: first try, growth after an accepted step, shrink after a rejected one,
#: bounds.
_STEP_START, _STEP_GROW, _STEP_SHRINK, _STEP_MIN, _STEP_MAX = 1.0, 1.5, 0.5, 0.25, 8.0

#: Cost of one elementwise pass (Hadamards, normalizations), in flop equivalents per element:
#: these passes are memory-bound.
_PASS_FLOPS = 8.0

Callback = Optional[Callable[[int, float], object]]

#: Why the sweeps stopped: see :class:`CPDecomposition`.
STOP_REASONS = ("tol", "exact_fit", "n_iter_max", "max_seconds", "zero_tensor")


class CPDecomposition(NamedTuple):
    """Result of :func:`cp_als`.

    Attributes
    ----------
    weights : Tensor
        Shape ``(R,)``, non-negative, in decreasing order.
    factors : list of Tensor
        ``factors[k]`` has shape ``(n_k, R)`` and unit-norm columns (zero columns where the
        weight is zero).
    n_iter : int
        ALS sweeps performed.
    rel_error : float
        ``||X - X_hat||_F / ||X||_F`` of the returned decomposition (0.0 when ``X`` is zero).
    stop_reason : str
        ``'tol'`` (the error stopped improving), ``'exact_fit'`` (rounding level),
        ``'n_iter_max'``, ``'max_seconds'`` (the time bound: the best fit so far is
        returned) or ``'zero_tensor'``.
    seconds : float
        Wall-clock time of the call.
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    n_iter: int
    rel_error: float
    stop_reason: str = "tol"
    seconds: float = 0.0

    def to_tensor(self) -> torch.Tensor:
        """The full tensor ``sum_r weights[r] * factors[0][:, r] ∘ ... ∘ factors[-1][:, r]``."""
        return cp_to_tensor(self.weights, self.factors)


def _split(shape: Sequence[int]) -> int:
    """Index ``p`` in ``1..N-1`` that balances ``prod(shape[:p])`` and ``prod(shape[p:])``."""
    best, best_cost = 1, None
    for p in range(1, len(shape)):
        cost = max(math.prod(shape[:p]), math.prod(shape[p:]))
        if best_cost is None or cost < best_cost:
            best, best_cost = p, cost
    return best


def cp_to_tensor(weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild the full tensor of a CP decomposition.

    Parameters
    ----------
    weights : Tensor
        Shape ``(R,)``.
    factors : sequence of Tensor
        ``factors[k]`` of shape ``(n_k, R)``.

    Returns
    -------
    Tensor
        Shape ``(n_0, ..., n_{N-1})``.
    """
    shape = tuple(int(f.shape[0]) for f in factors)
    if len(factors) == 1:
        return factors[0] @ weights
    p = _split(shape)
    left = khatri_rao(factors[:p]) * weights  # (prod left, R)
    right = khatri_rao(factors[p:])  # (prod right, R)
    return (left @ right.mT).reshape(shape)


# --------------------------------------------------------------------------------------------
# Blocks, cost and memory models.
# --------------------------------------------------------------------------------------------
def auto_block_size(shape: Sequence[int], rank: int) -> int:
    """Components per block of a sweep: ``rank`` itself (full ALS) or a smaller block.

    Full ALS costs ``N R^3 / 3`` (solves) plus ``4 numel R`` (MTTKRP GEMMs) per sweep; blocked
    ALS ``N R b^2 / 3 + 8 numel R``. Blocks pay once ``R^2 > 12 numel / N``; they then hold
    ``b ~ sqrt(3 numel / N)`` components (at least 64), which keeps the solves at about an
    eighth of the GEMMs, balanced over ``ceil(R / b)`` blocks.

    Examples
    --------
    >>> auto_block_size((6, 8, 8, 6, 8, 8), 328), auto_block_size((6, 8, 8, 6, 8, 8), 1638)
    (328, 234)
    """
    shape = tuple(int(n) for n in shape)
    numel, n_modes = math.prod(shape), len(shape)
    if rank * rank <= 12 * numel / n_modes:
        return int(rank)
    target = max(64, int(math.sqrt(3 * numel / n_modes)))
    n_blocks = math.ceil(rank / target)
    return int(math.ceil(rank / n_blocks))


def _check_block_size(block_size: object, shape: tuple[int, ...], rank: int) -> int:
    if block_size is None:
        return auto_block_size(shape, rank)
    return min(check_positive_int("block_size", block_size), rank)


def _sweep_flops(shape: Sequence[int], rank: int, block: int, line_search: bool) -> float:
    """Flop-equivalents of one sweep (see :func:`estimate_cp_als_seconds`)."""
    numel, n_modes = math.prod(shape), len(shape)
    p = _split(shape)
    half = math.prod(shape[:p]) + math.prod(shape[p:])
    n_blocks = math.ceil(rank / block)
    gemm = (8.0 if n_blocks > 1 else 4.0) * numel * rank  # MTTKRPs (+ residual updates)
    partial = 2.0 * half * rank * n_modes  # group contractions of the partial MTTKRPs
    solve = n_modes * rank * (block * block / 3 + 2 * max(shape) * block)  # Cholesky + solves
    grams = sum(2.0 * n * block * rank for n in shape)  # factor Grams, b x b per block
    hadamard = _PASS_FLOPS * n_modes * (n_modes - 1) * block * rank  # products of Grams
    search = 2.0 * numel * rank + _PASS_FLOPS * numel if line_search else 0.0
    return gemm + partial + solve + grams + hadamard + search


def _init_flops(shape: Sequence[int]) -> float:
    numel = math.prod(shape)
    return sum(2.0 * numel * n + 10.0 * n**3 for n in shape) + 4.0 * _PASS_FLOPS * numel


def estimate_cp_als_seconds(
    shape: Sequence[int],
    rank: int,
    *,
    n_iter_max: int = 100,
    block_size: int | None = None,
    line_search: bool = True,
    max_seconds: float | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Worst-case run time of :func:`cp_als`, in seconds, from the shape and options alone.

    A FLOP count (GEMMs, Cholesky solves, Grams, memory-bound passes weighted as 8 flops per
    element) of the initialization and of ``n_iter_max`` sweeps, divided by
    :func:`~factlin.decompositions.budget.flops_per_second`. With ``max_seconds``, the run
    stops before a sweep that would end past it, so the estimate is at most ``max_seconds``
    plus the initialization and one sweep. Runs that stop on their tolerance take less.

    Examples
    --------
    >>> secs = estimate_cp_als_seconds((16,) * 6, 8648)  # 4096 x 4096 at 5% parameters
    >>> secs > 600, estimate_cp_als_seconds((16,) * 6, 8648, max_seconds=60) < secs
    (True, True)
    """
    shape = tuple(int(n) for n in shape)
    rank = int(rank)
    block = auto_block_size(shape, rank) if block_size is None else min(int(block_size), rank)
    rate = flops_per_second(device)
    init = _init_flops(shape) / rate
    sweep = _sweep_flops(shape, rank, block, line_search) / rate
    total = init + n_iter_max * sweep
    if max_seconds is not None:
        total = min(total, init + float(max_seconds) + sweep)
    return total


def estimate_cp_als_memory(
    shape: Sequence[int], rank: int, itemsize: int, block_size: int | None = None
) -> int:
    """Peak working memory of :func:`cp_als`, in bytes, from the shape and rank alone.

    Counts the working copy of the tensor, the residual and the reconstruction (or the
    extrapolated candidate's residual), the factors with their previous and extrapolated copies,
    the two half Khatri-Rao products and partial MTTKRPs of a block, the ``N + 4`` Gram-sized
    ``b × b`` buffers of a block of ``b`` components (factor Grams, their Hadamard product, its
    Cholesky factor, temporaries; ``b = R`` for full ALS) and the float64 Gram of the largest
    unfolding for the SVD initialization.
    """
    shape = tuple(int(n) for n in shape)
    numel = math.prod(shape)
    p = _split(shape) if len(shape) > 1 else 1
    half = max(math.prod(shape[:p]), math.prod(shape[p:]))
    r = int(rank)
    b = auto_block_size(shape, r) if block_size is None else min(int(block_size), r)
    elements = (
        4 * numel  # working copy, residual, reconstruction / candidate, unfolding for the init
        + 4 * sum(shape) * r  # factors, previous sweep, candidate, MTTKRP results
        + 3 * half * b  # Khatri-Rao product, partial MTTKRP, contraction temporaries
        + (len(shape) + 4) * b * b  # Grams, their Hadamard product, Cholesky factor
    )
    gram_init = max(min(n, numel // n) ** 2 for n in shape)
    return elements * int(itemsize) + 8 * (gram_init + b * b)


# --------------------------------------------------------------------------------------------
# Initialization and one sweep.
# --------------------------------------------------------------------------------------------
def _normalized(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns scaled to unit norm (zero columns kept) and the norms."""
    norms = torch.linalg.vector_norm(matrix, dim=0)
    return matrix / torch.where(norms > 0, norms, torch.ones_like(norms)), norms


def _init_random(x: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    return [
        _normalized(randn((n, rank), generator, dtype=x.dtype, device=x.device))[0] for n in x.shape
    ]


def _init_svd(x: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    factors = []
    for mode, n in enumerate(x.shape):
        vectors, _ = left_singular_vectors(unfold(x, mode), min(n, rank), generator=generator)
        if rank > n:
            extra = randn((n, rank - n), generator, dtype=x.dtype, device=x.device)
            vectors = torch.cat([vectors, _normalized(extra)[0]], dim=1)
        factors.append(vectors)
    return factors


_INITS = {"svd": _init_svd, "random": _init_random}


def _hadamard_except(grams: Sequence[torch.Tensor], skip: int) -> torch.Tensor:
    """Elementwise product of every Gram but ``grams[skip]``."""
    others = [g for j, g in enumerate(grams) if j != skip]
    out = others[0].clone()
    for gram in others[1:]:
        out.mul_(gram)
    return out


def _group_mttkrp(partial: torch.Tensor, group: Sequence[torch.Tensor], local: int) -> torch.Tensor:
    """MTTKRP of mode ``local`` of a group from its partial tensor ``(n_0, .., n_g, R)``.

    Contracts every other mode of the group with its factor column by column (broadcast
    multiply and sum: memory-bound, and much faster than ``einsum``'s batched GEMVs here).
    """
    out = partial
    rank = partial.shape[-1]
    for mode in sorted((j for j in range(len(group)) if j != local), reverse=True):
        view = [1] * out.ndim
        view[mode], view[-1] = group[mode].shape[0], rank
        # (.., n_mode, .., R) * (1, .., n_mode, .., R) summed over n_mode
        out = (out * group[mode].reshape(view)).sum(mode)
    return out  # (n_local, R)


class _Sweep(NamedTuple):
    """What the last mode's update of an ALS sweep leaves for the cheap error estimate."""

    mttkrp: torch.Tensor
    solution: torch.Tensor
    gram_others: torch.Tensor


def _als_sweep(
    target: torch.Tensor,
    factors: list[torch.Tensor],
    grams: list[torch.Tensor],
    shape: tuple[int, ...],
    p: int,
) -> tuple[torch.Tensor, _Sweep]:
    """One ALS sweep of ``factors`` (all modes, Gauss-Seidel) against the matrix ``target``.

    ``factors`` and ``grams`` are updated in place (unit columns); returns the weights (the last
    mode's column norms) and the last update's terms.
    """
    n_modes, rank = len(shape), factors[0].shape[1]
    for first, stop in ((0, p), (p, n_modes)):
        if first == 0:
            # T (L, Rt) @ KR(right factors) (Rt, R) -> (L, R) -> (n_0, .., n_{p-1}, R)
            partial = (target @ khatri_rao(factors[p:])).reshape(*shape[:p], rank)
        else:
            # T^T (Rt, L) @ KR(left factors) (L, R) -> (Rt, R) -> (n_p, .., n_{N-1}, R)
            partial = (target.mT @ khatri_rao(factors[:p])).reshape(*shape[p:], rank)
        for mode in range(first, stop):
            mttkrp = _group_mttkrp(partial, factors[first:stop], mode - first)  # (n_k, R)
            gram_others = _hadamard_except(grams, mode)  # (R, R)
            solution = spd_solve_right(gram_others, mttkrp)  # (n_k, R)
            factors[mode], weights = _normalized(solution)
            grams[mode] = factors[mode].mT @ factors[mode]
    return weights, _Sweep(mttkrp, solution, gram_others)


def _reconstruct(factors: Sequence[torch.Tensor], weights: torch.Tensor, p: int) -> torch.Tensor:
    """``KR(left) diag(w) KR(right)^T``: the model as an ``(L, Rt)`` matrix."""
    return (khatri_rao(factors[:p]) * weights) @ khatri_rao(factors[p:]).mT


def _blocked_sweep(
    residual: torch.Tensor,
    factors: list[torch.Tensor],
    weights: torch.Tensor,
    shape: tuple[int, ...],
    p: int,
    blocks: Sequence[tuple[int, int]],
) -> None:
    """One blocked ALS sweep: every block, in turn, refitted to the residual with itself added
    back; ``residual``, ``factors`` and ``weights`` updated in place."""
    for start, stop in blocks:
        block = [f[:, start:stop] for f in factors]
        # E (L, Rt) += KR(left block) diag(w_block) KR(right block)^T: the block's target
        residual.addmm_(khatri_rao(block[:p]) * weights[start:stop], khatri_rao(block[p:]).mT)
        grams = [f.mT @ f for f in block]  # (b, b) each
        block_weights, _ = _als_sweep(residual, block, grams, shape, p)
        residual.addmm_(khatri_rao(block[:p]) * block_weights, khatri_rao(block[p:]).mT, alpha=-1)
        weights[start:stop] = block_weights
        for factor, value in zip(factors, block):
            factor[:, start:stop] = value


def _absorbed(factors: Sequence[torch.Tensor], weights: torch.Tensor) -> list[torch.Tensor]:
    """Copies of the factors with the weights moved into the last one (for extrapolation)."""
    return [f.clone() for f in factors[:-1]] + [factors[-1] * weights]


def _renormalized(absorbed: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Unit-column factors and weights of a CP whose scale sits anywhere in its factors."""
    scale = torch.ones_like(absorbed[0][0])
    factors = []
    for factor in absorbed:
        unit, norms = _normalized(factor)
        factors.append(unit)
        scale = scale * norms
    return factors, scale


# --------------------------------------------------------------------------------------------
# The algorithm.
# --------------------------------------------------------------------------------------------
def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = DEFAULT_TOL,
    init: str = "svd",
    random_state: RandomState = None,
    line_search: bool = True,
    block_size: int | None = None,
    max_seconds: float | None = None,
    time_limit_seconds: float | None = None,
    memory_limit_bytes: int | None = None,
    callback: Callback = None,
    verbose: bool = False,
) -> CPDecomposition:
    """CP decomposition of a tensor by alternating least squares.

    Parameters
    ----------
    tensor : Tensor
        At least 2 modes; float16/bfloat16 are computed in float32, results are cast back.
    rank : int
        Number of rank-one components ``R`` (may exceed every mode size).
    n_iter_max : int, default 100
        Maximum number of ALS sweeps (0 returns the initialization, every weight ``||X||``).
    tol : float, default 3e-4
        Stop when the relative improvement of the relative error over one sweep,
        ``(e_{t-1} - e_t) / e_{t-1}``, is at most ``tol``, or when the error reaches
        rounding level (``10 eps`` of the working dtype: an exact fit). The default matches
        the plateau of the error curves of trained weights (module notes); pass e.g. ``1e-8``
        to run to convergence.
    init : {'svd', 'random'}, default 'svd'
        ``'svd'``: leading left singular vectors of each unfolding, completed with random unit
        columns when ``R > n_k``; ``'random'``: Gaussian unit columns.
    random_state : int, torch.Generator or None
        Randomness for the initialization (None means seed 0: the result is deterministic).
    line_search : bool, default True
        Extrapolate the factors between sweeps when that lowers the error (module notes).
    block_size : int, optional
        Components updated together in a sweep; default :func:`auto_block_size` (all ``R``
        up to ``R^2 = 12 numel / N``, else blocks of about ``sqrt(3 numel / N)``).
    max_seconds : float, optional
        Time bound: no sweep is started that would end past ``max_seconds`` after the call
        began (judged from the previous sweep's duration, the cost model for the first); the
        fit reached so far is returned with ``stop_reason='max_seconds'``.
    time_limit_seconds : float, optional
        Refuse to start when the estimated worst-case time
        (:func:`estimate_cp_als_seconds`, which ``max_seconds`` bounds) exceeds this; default
        ``FACTLIN_TIME_LIMIT_SECONDS`` or 10 minutes (:mod:`factlin.decompositions.budget`).
    memory_limit_bytes : int, optional
        Refuse to start if the estimated working memory exceeds this (default: see
        :mod:`factlin.decompositions.memory`).
    callback : callable, optional
        Called as ``callback(iteration, rel_error)`` after every sweep; the error there is
        exact with blocks or after an extrapolation, else the cheap estimate from norms and
        Grams (exact once it is below ``30 sqrt(eps)``).
    verbose : bool, default False
        Log progress on the ``"factlin"`` logger (INFO).

    Returns
    -------
    CPDecomposition
        ``(weights, factors, n_iter, rel_error, stop_reason, seconds)`` in the dtype and on the
        device of ``tensor``; ``rel_error`` is computed exactly from the rebuilt tensor.

    Raises
    ------
    TypeError
        If ``tensor`` is not a floating-point tensor or an argument has the wrong type.
    ValueError
        On a bad rank, option, NaN/inf input (:class:`~factlin.errors.InputError`), when the
        memory estimate exceeds the limit (:class:`~.memory.MemoryLimitError`) or the time
        estimate does (:class:`~.budget.TimeLimitError`), both before any work.

    Notes
    -----
    Each sweep updates ``A_k = MTTKRP_k V_k^{-1}`` with ``V_k`` the Hadamard product of the
    other factors' Grams (a Cholesky solve; on failure a growing diagonal jitter, then a
    pseudo-inverse, so ill-conditioned and rank-deficient Grams give no NaN), then moves the
    column norms into ``weights``. With blocks (``block_size < R``) a sweep does this for each
    block of components against the residual. The error is tracked exactly from the residual
    with blocks; without, from ``||X||^2 - 2 <X, X_hat> + ||X_hat||^2`` (the tensor is rebuilt
    once that estimate falls below ``30 sqrt(eps)``, where it is mostly cancellation noise).
    The returned ``rel_error`` is always exact.

    Defaults, measured on the 36 linear weights of all-MiniLM-L6-v2 (``benchmarks/README.md``):
    ALS converges slowly at these ranks (still ~1e-4 relative per sweep after 100 sweeps);
    extrapolation reaches the error of ``k`` plain sweeps in about ``k / 2``, and ``tol=3e-4``
    stops within a few thousandths of the 100-sweep error, in about a third of the sweeps.

    References
    ----------
    .. [1] T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review
       51(3), 2009.
    .. [2] R. Bro, "Multi-way Analysis in the Food Industry", PhD thesis, 1998.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 5, 6, 7)]
    >>> x = cp_to_tensor(torch.ones(3, dtype=torch.float64), factors)
    >>> cp = cp_als(x, 3)
    >>> cp.weights.shape, cp.rel_error < 1e-8, cp.stop_reason
    (torch.Size([3]), True, 'exact_fit')
    """
    started = time.perf_counter()
    check_tensor(tensor, min_ndim=2)
    rank = check_positive_int("rank", rank)
    n_iter_max = check_nonnegative_int("n_iter_max", n_iter_max)
    tol = check_tol("tol", tol)
    init_fn = _INITS[check_choice("init", init, tuple(_INITS))]
    generator = make_generator(random_state)
    if not isinstance(line_search, bool):
        raise TypeError(f"line_search={describe(line_search)}: expected True or False")
    if max_seconds is not None:
        max_seconds = check_seconds("max_seconds", max_seconds)
    check_callback(callback)
    shape = tuple(int(n) for n in tensor.shape)
    block = _check_block_size(block_size, shape, rank)
    dtype = working_dtype(tensor.dtype)
    what = f"cp_als(shape={shape}, rank={rank}, dtype={dtype})"
    check_memory(
        estimate_cp_als_memory(shape, rank, dtype.itemsize, block),
        what=what,
        advice="Lower the rank, or use a Tucker or TT factorization.",
        limit_bytes=memory_limit_bytes,
        device=tensor.device,
    )
    sweep_flops = _sweep_flops(shape, rank, block, line_search)
    rate = flops_per_second(tensor.device)
    estimate = estimate_cp_als_seconds(
        shape,
        rank,
        n_iter_max=n_iter_max,
        block_size=block,
        line_search=line_search,
        max_seconds=max_seconds,
        device=tensor.device,
    )
    check_time(
        estimate,
        what=f"{what} with n_iter_max={n_iter_max} (about "
        f"{format_seconds(sweep_flops / rate)} a sweep)",
        advice="Pass max_seconds=S for the best fit within S seconds, a larger "
        "time_limit_seconds (or FACTLIN_TIME_LIMIT_SECONDS) to allow it, fewer sweeps "
        "(n_iter_max), a lower rank, or a Tucker or TT factorization (seconds at this size).",
        limit_seconds=time_limit_seconds,
    )
    reject_meta(tensor)
    check_finite(tensor)

    norm = math.sqrt(sq_norm(tensor))
    # work on X / ||X||: no underflow of squared entries for tiny tensors, no overflow for huge
    x = tensor.to(dtype) / norm if norm > 0 else tensor.to(dtype)
    p = _split(shape)
    x_mat = x.reshape(math.prod(shape[:p]), math.prod(shape[p:]))  # (prod left, prod right)
    norm_sq = sq_norm(x)
    factors = init_fn(x, rank, generator)
    if norm_sq == 0.0:
        return _finish(tensor, x.new_zeros(rank), factors, 0, 0.0, "zero_tensor", started)
    if n_iter_max == 0:
        weights = x.new_ones(rank)
        error = relative_error(x, cp_to_tensor(weights, factors), norm_sq)
        return _finish(tensor, weights * norm, factors, 0, error, "n_iter_max", started)

    blocks = [(s, min(rank, s + block)) for s in range(0, rank, block)]
    if len(blocks) > 1:
        # start from the zero model: the first sweep fits the blocks greedily to the residual
        weights = x.new_zeros(rank)
        residual: torch.Tensor | None = x_mat.clone()
        grams: list[torch.Tensor] = []
    else:
        weights = x.new_ones(rank)
        residual = None
        grams = [f.mT @ f for f in factors]  # (R, R) each
    exact_below = _EXACT_ERROR_FACTOR * math.sqrt(torch.finfo(dtype).eps)
    exact_fit = _EXACT_FIT_FACTOR * torch.finfo(dtype).eps
    previous: float | None = None
    before: list[torch.Tensor] | None = None  # absorbed factors after the previous sweep
    step = _STEP_START
    sweep_seconds = sweep_flops / rate
    reason = "n_iter_max"
    n_iter = 0
    for iteration in range(1, n_iter_max + 1):
        if max_seconds is not None:
            elapsed = time.perf_counter() - started
            if elapsed + sweep_seconds > max_seconds:
                reason = "max_seconds"
                break
        sweep_start = time.perf_counter()
        n_iter = iteration
        if residual is not None:
            _blocked_sweep(residual, factors, weights, shape, p, blocks)
            rel_error = math.sqrt(sq_norm(residual) / norm_sq)
        else:
            weights, last = _als_sweep(x_mat, factors, grams, shape, p)
            # ||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2, from the last update:
            # <X, X_hat> = <MTTKRP, A>, ||X_hat||^2 = sum((A^T A) * V) with A = solution.
            inner = float((last.mttkrp * last.solution).sum(dtype=torch.float64))
            model_sq = float(
                ((last.solution.mT @ last.solution) * last.gram_others).sum(dtype=torch.float64)
            )
            rel_error = math.sqrt(max(norm_sq - 2.0 * inner + model_sq, 0.0) / norm_sq)
            if rel_error < exact_below:  # the estimate is mostly rounding noise down there
                rel_error = relative_error(x, cp_to_tensor(weights, factors), norm_sq)
        if line_search and rel_error > exact_below:
            current = _absorbed(factors, weights)
            if before is not None:
                # A_t + s (A_t - A_{t-1}), kept if it lowers the exact error
                candidate = [a + step * (a - b) for a, b in zip(current, before)]
                moved = x_mat - _reconstruct(candidate, torch.ones_like(weights), p)
                moved_error = math.sqrt(sq_norm(moved) / norm_sq)
                if moved_error < rel_error:
                    factors, weights = _renormalized(candidate)
                    current, rel_error = candidate, moved_error
                    if residual is not None:
                        residual = moved
                    else:
                        grams = [f.mT @ f for f in factors]
                    step = min(step * _STEP_GROW, _STEP_MAX)
                else:
                    step = max(step * _STEP_SHRINK, _STEP_MIN)
            before = current
        sweep_seconds = time.perf_counter() - sweep_start
        if callback is not None:
            callback(iteration, rel_error)
        if verbose:
            _LOGGER.info("cp_als: sweep %d, relative error %.6e", iteration, rel_error)
        if rel_error <= exact_fit:
            reason = "exact_fit"
            break
        if previous is not None and previous - rel_error <= tol * previous:
            reason = "tol"
            break
        previous = rel_error
    approx = cp_to_tensor(weights, factors)
    if n_iter == 0:  # the time bound allowed no sweep: the best multiple of the init
        model_sq = sq_norm(approx)
        scale = float((x * approx).sum(dtype=torch.float64)) / model_sq if model_sq else 0.0
        weights, approx = weights * max(scale, 0.0), approx * max(scale, 0.0)
    final_error = relative_error(x, approx, norm_sq)
    if final_error <= exact_fit:
        reason = "exact_fit"
    if verbose:
        _LOGGER.info(
            "cp_als: stopped after %d sweep(s) (%s), rel_error %.6e", n_iter, reason, final_error
        )
    return _finish(tensor, weights * norm, factors, n_iter, final_error, reason, started)


def _finish(
    tensor: torch.Tensor,
    weights: torch.Tensor,
    factors: list[torch.Tensor],
    n_iter: int,
    rel_error: float,
    stop_reason: str,
    started: float,
) -> CPDecomposition:
    """Sort components by decreasing weight and cast back to the input dtype."""
    order = torch.argsort(weights, descending=True, stable=True)
    return CPDecomposition(
        weights=weights[order].to(tensor.dtype),
        factors=[f[:, order].to(tensor.dtype) for f in factors],
        n_iter=int(n_iter),
        rel_error=float(rel_error),
        stop_reason=stop_reason,
        seconds=time.perf_counter() - started,
    )
