"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares.

The MTTKRP of every mode is computed from one of two half-contractions: the modes are split into
a left group and a right group of balanced sizes, the tensor is viewed as the matrix
``X (prod left, prod right)``, and one GEMM with the Khatri-Rao product of the *other* group's
factors (``prod right × R`` or ``prod left × R``, never ``prod(shape) × R``) gives a partial
tensor from which each mode of the group is a cheap contraction. Two GEMMs per sweep instead of
one per mode, and the usual Gauss-Seidel order is kept because a group's partial only involves
the other group's factors.

References
----------
.. [1] T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3),
   2009, §3.4 (CP-ALS).
.. [2] A.-H. Phan, P. Tichavský and A. Cichocki, "Fast Alternating LS Algorithms for High Order
   CANDECOMP/PARAFAC Tensor Factorizations", IEEE Trans. Signal Processing 61(19), 2013
   (partial MTTKRPs shared between modes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional

import torch

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
from .memory import check_memory

__all__ = ["CPDecomposition", "cp_als", "cp_to_tensor", "estimate_cp_als_memory"]

_LOGGER = logging.getLogger("factlin")

#: Below ``_EXACT_ERROR_FACTOR * sqrt(eps)`` the cheap error estimate is replaced by the exact
#: error (one rebuild of the tensor), because cancellation in ``||X||^2 - 2<X, X_hat> +
#: ||X_hat||^2`` leaves little more than rounding noise there.
_EXACT_ERROR_FACTOR = 30.0

#: Sweeps stop once the exact error is at rounding level, ``_EXACT_FIT_FACTOR * eps``.
_EXACT_FIT_FACTOR = 10.0

Callback = Optional[Callable[[int, float], object]]


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
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    n_iter: int
    rel_error: float

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


def estimate_cp_als_memory(shape: Sequence[int], rank: int, itemsize: int) -> int:
    """Peak working memory of :func:`cp_als`, in bytes, from the shape and rank alone.

    Counts the working copy of the tensor and the final reconstruction, an unfolding copy for
    the SVD init, the factors, the two half Khatri-Rao products and partial MTTKRPs, the
    ``N + 4`` Gram-sized ``R × R`` buffers (factor Grams, their Hadamard product, its Cholesky
    factor, temporaries) and the float64 Gram of the largest unfolding.
    """
    shape = tuple(int(n) for n in shape)
    numel = math.prod(shape)
    p = _split(shape) if len(shape) > 1 else 1
    half = max(math.prod(shape[:p]), math.prod(shape[p:]))
    r = int(rank)
    elements = (
        3 * numel  # working copy, reconstruction, unfolding for the init
        + 2 * sum(shape) * r  # factors and MTTKRP results
        + 3 * half * r  # Khatri-Rao product, partial MTTKRP, contraction temporaries
        + (len(shape) + 4) * r * r  # Grams, their Hadamard product, Cholesky factor
    )
    gram_init = max(min(n, numel // n) ** 2 for n in shape)
    return elements * int(itemsize) + 8 * (gram_init + r * r)


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


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    init: str = "svd",
    random_state: RandomState = None,
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
    tol : float, default 1e-8
        Stop when the relative change of the relative error between two sweeps,
        ``|e_{t-1} - e_t| / e_{t-1}``, is at most ``tol``, or when the error reaches
        rounding level (``10 eps`` of the working dtype: an exact fit).
    init : {'svd', 'random'}, default 'svd'
        ``'svd'``: leading left singular vectors of each unfolding, completed with random unit
        columns when ``R > n_k``; ``'random'``: Gaussian unit columns.
    random_state : int, torch.Generator or None
        Randomness for the initialization (None means seed 0: the result is deterministic).
    memory_limit_bytes : int, optional
        Refuse to start if the estimated working memory exceeds this (default: see
        :mod:`factlin.decompositions.memory`).
    callback : callable, optional
        Called as ``callback(iteration, rel_error)`` after every sweep; the error there is the
        cheap estimate from norms and Grams (exact once it is below ``30 sqrt(eps)``).
    verbose : bool, default False
        Log progress on the ``"factlin"`` logger (INFO).

    Returns
    -------
    CPDecomposition
        ``(weights, factors, n_iter, rel_error)`` in the dtype and on the device of ``tensor``;
        ``rel_error`` is computed exactly from the rebuilt tensor.

    Raises
    ------
    TypeError
        If ``tensor`` is not a floating-point tensor or an argument has the wrong type.
    ValueError
        On a bad rank, option, NaN/inf input (:class:`~factlin.errors.InputError`), or when the
        memory estimate exceeds the limit (:class:`~.memory.MemoryLimitError`).

    Notes
    -----
    Each sweep updates ``A_k = MTTKRP_k V_k^{-1}`` with ``V_k`` the Hadamard product of the
    other factors' Grams (a safe Cholesky solve), then moves the column norms into ``weights``.
    The error is tracked from ``||X||^2 - 2 <X, X_hat> + ||X_hat||^2`` without rebuilding the
    tensor; once that estimate falls below ``30 sqrt(eps)`` (about ``1e-2`` in float32), where
    it is mostly cancellation noise, the tensor is rebuilt to get the exact error. The returned
    ``rel_error`` is always exact.

    References
    ----------
    .. [1] T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review
       51(3), 2009.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 5, 6, 7)]
    >>> x = cp_to_tensor(torch.ones(3, dtype=torch.float64), factors)
    >>> cp = cp_als(x, 3)
    >>> cp.weights.shape, cp.rel_error < 1e-8
    (torch.Size([3]), True)
    """
    check_tensor(tensor, min_ndim=2)
    rank = check_positive_int("rank", rank)
    n_iter_max = check_nonnegative_int("n_iter_max", n_iter_max)
    tol = check_tol("tol", tol)
    init_fn = _INITS[check_choice("init", init, tuple(_INITS))]
    generator = make_generator(random_state)
    check_callback(callback)
    shape = tuple(int(n) for n in tensor.shape)
    dtype = working_dtype(tensor.dtype)
    check_memory(
        estimate_cp_als_memory(shape, rank, dtype.itemsize),
        what=f"cp_als(shape={shape}, rank={rank}, dtype={dtype})",
        advice="Lower the rank, or use a Tucker or TT factorization.",
        limit_bytes=memory_limit_bytes,
        device=tensor.device,
    )
    reject_meta(tensor)
    check_finite(tensor)

    norm = math.sqrt(sq_norm(tensor))
    # work on X / ||X||: no underflow of squared entries for tiny tensors, no overflow for huge
    x = tensor.to(dtype) / norm if norm > 0 else tensor.to(dtype)
    n_modes = len(shape)
    p = _split(shape)
    x_mat = x.reshape(math.prod(shape[:p]), math.prod(shape[p:]))  # (prod left, prod right)
    norm_sq = sq_norm(x)
    factors = init_fn(x, rank, generator)
    if norm_sq == 0.0:
        weights = x.new_zeros(rank)
        return _finish(tensor, weights, factors, 0, 0.0)

    grams = [f.mT @ f for f in factors]  # (R, R) each
    weights = x.new_ones(rank)
    previous: float | None = None
    exact_below = _EXACT_ERROR_FACTOR * math.sqrt(torch.finfo(dtype).eps)
    exact_fit = _EXACT_FIT_FACTOR * torch.finfo(dtype).eps
    n_iter = 0
    for n_iter in range(1, n_iter_max + 1):
        for first, stop in ((0, p), (p, n_modes)):
            if first == 0:
                # X (L, Rt) @ KR(right factors) (Rt, R) -> (L, R) -> (n_0, .., n_{p-1}, R)
                partial = (x_mat @ khatri_rao(factors[p:])).reshape(*shape[:p], rank)
            else:
                # X^T (Rt, L) @ KR(left factors) (L, R) -> (Rt, R) -> (n_p, .., n_{N-1}, R)
                partial = (x_mat.mT @ khatri_rao(factors[:p])).reshape(*shape[p:], rank)
            for mode in range(first, stop):
                mttkrp = _group_mttkrp(partial, factors[first:stop], mode - first)  # (n_k, R)
                gram_others = _hadamard_except(grams, mode)  # (R, R)
                solution = spd_solve_right(gram_others, mttkrp)  # (n_k, R)
                factors[mode], weights = _normalized(solution)
                grams[mode] = factors[mode].mT @ factors[mode]
        # ||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2, from the last mode's update:
        # <X, X_hat> = <MTTKRP, A>, ||X_hat||^2 = sum((A^T A) * V) with A = solution.
        inner = float((mttkrp * solution).sum(dtype=torch.float64))
        model_sq = float(((solution.mT @ solution) * gram_others).sum(dtype=torch.float64))
        rel_error = math.sqrt(max(norm_sq - 2.0 * inner + model_sq, 0.0) / norm_sq)
        if rel_error < exact_below:  # the estimate is mostly rounding noise down there
            rel_error = relative_error(x, cp_to_tensor(weights, factors), norm_sq)
        if callback is not None:
            callback(n_iter, rel_error)
        if verbose:
            _LOGGER.info("cp_als: sweep %d, relative error %.6e", n_iter, rel_error)
        if rel_error <= exact_fit or (
            previous is not None and abs(previous - rel_error) <= tol * previous
        ):
            break
        previous = rel_error
    approx = cp_to_tensor(weights, factors)
    final_error = relative_error(x, approx, norm_sq)
    if verbose:
        _LOGGER.info("cp_als: stopped after %d sweep(s), rel_error %.6e", n_iter, final_error)
    return _finish(tensor, weights * norm, factors, n_iter, final_error)


def _finish(
    tensor: torch.Tensor,
    weights: torch.Tensor,
    factors: list[torch.Tensor],
    n_iter: int,
    rel_error: float,
) -> CPDecomposition:
    """Sort components by decreasing weight and cast back to the input dtype."""
    order = torch.argsort(weights, descending=True, stable=True)
    return CPDecomposition(
        weights=weights[order].to(tensor.dtype),
        factors=[f[:, order].to(tensor.dtype) for f in factors],
        n_iter=int(n_iter),
        rel_error=float(rel_error),
    )
