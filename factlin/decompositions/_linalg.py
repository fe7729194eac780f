"""Linear-algebra helpers shared by the decomposition algorithms.

Mode unfolding and folding, mode products, Khatri-Rao products of a few factors, truncated SVDs
of unfoldings (Gram eigendecomposition, or a randomized range finder when both sides are large),
a safe symmetric positive semi-definite solve, argument checks and the working-dtype rule
(float16/bfloat16 are computed in float32 and cast back).

References
----------
.. [1] T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3),
   2009.
.. [2] N. Halko, P.-G. Martinsson and J. A. Tropp, "Finding Structure with Randomness:
   Probabilistic Algorithms for Constructing Approximate Matrix Decompositions", SIAM Review
   53(2), 2011.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Union

import torch

from ..errors import FactlinError, InputError, RankError, describe

#: What ``random_state`` may be.
RandomState = Union[int, torch.Generator, None]

#: Seed used when ``random_state`` is None, so that every algorithm is a pure function.
DEFAULT_SEED = 0

#: Elements per column (or row) block when a Gram matrix is accumulated in float64.
GRAM_BLOCK_ELEMENTS = 1 << 22

#: The smaller side of an unfolding above which a randomized SVD may replace the Gram eigh.
RANDOMIZED_MIN_SIDE = 1024

#: Oversampling and power iterations of the randomized range finder (Halko et al. 2011, §4).
RANDOMIZED_OVERSAMPLING = 10
RANDOMIZED_POWER_ITERATIONS = 2

#: Elements per block when a Gram matrix is formed from float32 products summed in float64
#: (``mixed=True``): small enough for a block's copy to stay in cache.
MIXED_GRAM_BLOCK_ELEMENTS = 1 << 20

#: Largest-entry range within which float32 squares neither overflow nor lose the large
#: entries to underflow; outside it the float64 route is used.
MIXED_SAFE_RANGE = (1e-12, 1e12)

#: With ``mixed``, a truncation that discards less than this fraction of the Gram's trace (a
#: relative error under 1e-3, where float32 Gram rounding would show) recomputes the Gram
#: with float64 blocks, so that near-exact fits keep float64-Gram accuracy.
MIXED_MIN_TAIL = 1e-6

_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
_KEPT = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Argument checks (all run before any work).
# --------------------------------------------------------------------------------------------
def check_tensor(tensor: object, *, name: str = "tensor", min_ndim: int = 1) -> torch.Tensor:
    """A real floating-point tensor with ``ndim >= min_ndim``, no empty mode, no NaN/inf.

    The finiteness check is skipped for tensors on the ``meta`` device (they hold no data).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}={describe(tensor)}: expected a torch.Tensor")
    if tensor.dtype not in _UPCAST and tensor.dtype not in _KEPT:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}: expected float16, bfloat16, float32 or float64"
        )
    if tensor.ndim < min_ndim:
        raise InputError(
            f"{name} has shape {tuple(tensor.shape)}: expected at least {min_ndim} dimension(s)"
        )
    if any(size == 0 for size in tensor.shape):
        raise InputError(f"{name} has shape {tuple(tensor.shape)}: every mode must be non-empty")
    return tensor


def check_finite(tensor: torch.Tensor, *, name: str = "tensor") -> None:
    """Raise :class:`InputError` if ``tensor`` holds NaN or inf (no-op on the meta device)."""
    if tensor.device.type == "meta":
        return
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise InputError(
            f"{name} contains {n_bad} NaN/inf value(s) out of {tensor.numel()}: "
            "expected only finite values"
        )


def reject_meta(tensor: torch.Tensor, *, name: str = "tensor") -> None:
    """Raise once the memory guard has passed on a ``meta`` tensor, which holds no data."""
    if tensor.device.type == "meta":
        raise InputError(
            f"{name} is on the meta device: its shape passed the memory check, but it holds no "
            "data to decompose; pass a tensor on a real device"
        )


def check_positive_int(name: str, value: object) -> int:
    """A Python int ``>= 1`` (bools rejected, numpy integers accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={describe(value)}: expected a positive int")
    if value < 1:
        raise RankError(f"{name}={value}: expected a positive int")
    return int(value)


def check_nonnegative_int(name: str, value: object) -> int:
    """A Python int ``>= 0`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={describe(value)}: expected an int >= 0")
    if value < 0:
        raise FactlinError(f"{name}={value}: expected an int >= 0")
    return int(value)


def check_ranks(name: str, value: object, length: int) -> tuple[int, ...]:
    """A tuple of ``length`` positive Python ints."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name}={describe(value)}: expected a tuple of {length} positive ints")
    if len(value) != length:
        raise RankError(
            f"{name}={tuple(value)!r} has {len(value)} entries: expected {length} (one per mode)"
        )
    out = []
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, numbers.Integral):
            raise TypeError(
                f"{name}={tuple(value)!r}: every entry must be a positive int, "
                f"got {describe(entry)}"
            )
        if entry < 1:
            raise RankError(f"{name}={tuple(value)!r}: every entry must be >= 1, got {entry}")
        out.append(int(entry))
    return tuple(out)


def check_tol(name: str, value: object) -> float:
    """A finite real number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={describe(value)}: expected a float >= 0")
    if not math.isfinite(float(value)) or value < 0:
        raise FactlinError(f"{name}={value}: expected a finite float >= 0")
    return float(value)


def check_callback(value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"callback={describe(value)}: expected a callable(iteration, rel_error)")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """A case-insensitive name among ``choices``, returned lower-cased."""
    if not isinstance(value, str):
        raise TypeError(f"{name}={describe(value)}: expected one of {tuple(choices)}")
    key = value.strip().lower()
    if key not in choices:
        raise FactlinError(f"{name}={value!r} is not known; expected one of {tuple(choices)}")
    return key


# --------------------------------------------------------------------------------------------
# Dtypes and randomness.
# --------------------------------------------------------------------------------------------
def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return _UPCAST.get(dtype, dtype)


def make_generator(random_state: object) -> torch.Generator:
    """A ``torch.Generator`` from an int seed, a generator (used as is) or None (seed 0)."""
    if isinstance(random_state, torch.Generator):
        return random_state
    if random_state is None:
        random_state = DEFAULT_SEED
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"random_state={describe(random_state)}: expected an int seed, a torch.Generator "
            "or None"
        )
    generator = torch.Generator()
    generator.manual_seed(int(random_state))
    return generator


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Standard normal samples drawn on the generator's device, then moved to ``device``."""
    sample = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return sample.to(device)


# --------------------------------------------------------------------------------------------
# Unfolding, folding and products.
# --------------------------------------------------------------------------------------------
def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: shape ``(n_mode, prod(other sizes))``, other modes in order."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold` for a tensor of shape ``shape``."""
    moved = (shape[mode], *shape[:mode], *shape[mode + 1 :])
    return matrix.reshape(moved).movedim(0, mode)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor ×_mode matrix``: contract mode ``mode`` (size n) with ``matrix`` of shape (m, n).

    The result has size m in mode ``mode`` and the other modes unchanged.
    """
    # (m, n) · (..., n, ...) -> (m, ...) then move m back to position `mode`
    out = torch.tensordot(matrix, tensor, dims=([1], [mode]))
    return out.movedim(0, mode)


def khatri_rao(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, rows in C order: row ``(i_0, i_1, ...)`` is
    ``prod_k matrices[k][i_k, :]``; shape ``(prod n_k, R)``."""
    out = matrices[0]
    rank = out.shape[1]
    for matrix in matrices[1:]:
        # (a, R) x (b, R) -> (a, b, R) -> (a*b, R)
        out = (out[:, None, :] * matrix[None, :, :]).reshape(-1, rank)
    return out


def sq_norm(tensor: torch.Tensor) -> float:
    """Squared Frobenius norm, accumulated in float64."""
    flat = tensor.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), GRAM_BLOCK_ELEMENTS):
        block = flat[start : start + GRAM_BLOCK_ELEMENTS].to(torch.float64)
        total += float(torch.dot(block, block))
    return total


def relative_error(tensor: torch.Tensor, approx: torch.Tensor, tensor_sq_norm: float) -> float:
    """``||tensor - approx|| / ||tensor||`` (0.0 when ``tensor`` is zero)."""
    if tensor_sq_norm == 0.0:
        return 0.0
    return math.sqrt(sq_norm(approx - tensor) / tensor_sq_norm)


# --------------------------------------------------------------------------------------------
# Truncated SVD of a matrix (left singular vectors only).
# --------------------------------------------------------------------------------------------
def _gram(matrix: torch.Tensor, *, rows: bool) -> torch.Tensor:
    """``M M^T`` (``rows=True``) or ``M^T M`` in float64, accumulated in blocks."""
    m, n = matrix.shape
    if rows:
        gram = torch.zeros((m, m), dtype=torch.float64, device=matrix.device)
        step = max(1, GRAM_BLOCK_ELEMENTS // m)
        for start in range(0, n, step):
            block = matrix[:, start : start + step].to(torch.float64)  # (m, b)
            gram.addmm_(block, block.mT)
    else:
        gram = torch.zeros((n, n), dtype=torch.float64, device=matrix.device)
        step = max(1, GRAM_BLOCK_ELEMENTS // n)
        for start in range(0, m, step):
            block = matrix[start : start + step].to(torch.float64)  # (b, n)
            gram.addmm_(block.mT, block)
    return gram


def _gram_mixed(matrix: torch.Tensor, *, rows: bool) -> torch.Tensor:
    """Like :func:`_gram`, but each block's product is computed in float32 and the blocks are
    summed in float64 (for float32 matrices; see :func:`mixed_precision_ok`)."""
    m, n = matrix.shape
    side = m if rows else n
    gram = torch.zeros((side, side), dtype=torch.float64, device=matrix.device)
    step = max(1, MIXED_GRAM_BLOCK_ELEMENTS // side)
    for start in range(0, n if rows else m, step):
        if rows:
            block = matrix[:, start : start + step]  # (m, b)
            gram += (block @ block.mT).to(torch.float64)
        else:
            block = matrix[start : start + step]  # (b, n)
            gram += (block.mT @ block).to(torch.float64)
    return gram


def _needs_float64(values: torch.Tensor, rank: int) -> bool:
    """Whether a mixed-precision Gram with eigenvalues ``values`` truncated to ``rank`` must be
    recomputed in float64 (see :data:`MIXED_MIN_TAIL`)."""
    if rank >= values.numel():
        return False  # nothing discarded: any orthonormal basis of the full space will do
    total = float(values.sum())
    return total > 0.0 and float(values[rank:].sum()) < MIXED_MIN_TAIL * total


def _eigh_of_gram(
    matrix: torch.Tensor, rows: bool, rank: int, mixed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending eigenpairs of the Gram of ``matrix`` (rows or columns), mixed precision when
    allowed and accurate enough for a truncation to ``rank``, float64 blocks otherwise."""
    if mixed and matrix.dtype == torch.float32:
        values, vectors = _descending_eigh(_gram_mixed(matrix, rows=rows))
        if not _needs_float64(values, rank):
            return values, vectors
    return _descending_eigh(_gram(matrix, rows=rows))


def mixed_precision_ok(tensor: torch.Tensor, tensor_sq_norm: float) -> bool:
    """Whether Gram matrices of ``tensor`` may be formed from float32 block products.

    True for a float32 tensor whose squared norm (:func:`sq_norm`, already computed) puts its
    largest absolute entry inside :data:`MIXED_SAFE_RANGE` (``max|x| <= ||x||`` and
    ``max|x| >= ||x|| / sqrt(numel)``), so no extra pass is needed. Such Grams carry an
    absolute error of about ``1e-7 ||M||^2`` instead of ``1e-16 ||M||^2``: leading singular
    vectors whose gap ``s_r^2 - s_{r+1}^2`` is well above that are found as accurately as
    float32 data allow.
    """
    if tensor.dtype != torch.float32 or not math.isfinite(tensor_sq_norm):
        return False
    low, high = MIXED_SAFE_RANGE
    return tensor_sq_norm <= high**2 and tensor_sq_norm >= low**2 * tensor.numel()


def _descending_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp_min(0.0), vectors.flip(1)


def _orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (Householder QR) of the column space of a tall matrix."""
    q, _ = torch.linalg.qr(matrix, mode="reduced")
    return q


def _randomized_left(
    matrix: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized range finder with power iterations (Halko et al. 2011, Alg. 4.4 + 5.1)."""
    m, n = matrix.shape
    width = min(rank + RANDOMIZED_OVERSAMPLING, m, n)
    omega = randn((n, width), generator, dtype=matrix.dtype, device=matrix.device)
    basis = _orthonormal_columns(matrix @ omega)  # (m, w)
    for _ in range(RANDOMIZED_POWER_ITERATIONS):
        basis_t = _orthonormal_columns(matrix.mT @ basis)  # (n, w)
        basis = _orthonormal_columns(matrix @ basis_t)  # (m, w)
    small = basis.mT @ matrix  # (w, n)
    values, vectors = _descending_eigh(_gram(small, rows=True))  # (w,), (w, w)
    left = basis @ vectors[:, :rank].to(matrix.dtype)  # (m, rank)
    return left, values


def select_rank(sq_singular_values: torch.Tensor, max_rank: int, tail_energy: float) -> int:
    """Smallest rank ``r <= max_rank`` whose discarded energy ``sum_{j >= r} s_j^2`` is at most
    ``tail_energy`` (``max_rank`` when none is)."""
    values = sq_singular_values.to(torch.float64)
    # tails[r] = sum_{j >= r} s_j^2, for r = 0..len(values)
    tails = torch.cat([values.flip(0).cumsum(0).flip(0), values.new_zeros(1)])
    ok = torch.nonzero(tails[: max_rank + 1] <= tail_energy)
    return int(ok[0]) if ok.numel() else max_rank


def left_singular_vectors(
    matrix: torch.Tensor,
    rank: int,
    *,
    tail_energy: float | None = None,
    generator: torch.Generator | None = None,
    mixed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading left singular vectors of a matrix.

    Parameters
    ----------
    matrix : Tensor
        Shape ``(m, n)``, float32 or float64.
    rank : int
        Number of vectors wanted, ``1 <= rank <= m`` (it may exceed ``n``: the Gram path then
        completes the basis of ``R^m``).
    tail_energy : float, optional
        If given, the rank is lowered to the smallest one whose discarded energy (sum of the
        squared singular values left out) is at most ``tail_energy``.
    generator : torch.Generator, optional
        Randomness for the randomized path (seed 0 if None).
    mixed : bool, default False
        Form the Gram matrix from float32 block products summed in float64 (a float32
        ``matrix`` only; see :func:`mixed_precision_ok`) instead of float64 blocks; it is
        recomputed from float64 blocks when the truncation discards less than
        :data:`MIXED_MIN_TAIL` of its trace.

    Returns
    -------
    (U, s2) : tuple of Tensor
        ``U`` of shape ``(m, r)`` with orthonormal columns in ``matrix.dtype`` and the squared
        singular values found, in decreasing order, as float64.

    Notes
    -----
    The Gram matrix of the smaller side is accumulated in float64 and eigendecomposed; for a
    tall matrix the left vectors are recovered as an orthonormal basis of ``M V_r``. When both
    sides exceed ``RANDOMIZED_MIN_SIDE``, ``rank`` is below an eighth of the smaller side and no
    ``tail_energy`` is asked for, a randomized SVD (Halko et al. 2011) is used instead.
    """
    m, n = matrix.shape
    small = min(m, n)
    if tail_energy is None and small > RANDOMIZED_MIN_SIDE and 8 * rank <= small:
        return _randomized_left(matrix, rank, generator or make_generator(None))
    if m <= n or rank > n:
        values, vectors = _eigh_of_gram(matrix, True, rank, mixed)  # (m,), (m, m)
        if tail_energy is not None:
            rank = max(1, select_rank(values, rank, tail_energy))
        return vectors[:, :rank].to(matrix.dtype), values
    values, vectors = _eigh_of_gram(matrix, False, rank, mixed)  # (n,), (n, n)
    if tail_energy is not None:
        rank = max(1, select_rank(values, rank, tail_energy))
    projected = matrix @ vectors[:, :rank].to(matrix.dtype)  # (m, rank)
    return _orthonormal_columns(projected), values


def right_singular_vectors(
    matrix: torch.Tensor,
    rank: int,
    *,
    tail_energy: float | None = None,
    mixed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading right singular vectors of a matrix, from the eigendecomposition of ``M^T M``.

    Parameters
    ----------
    matrix : Tensor
        Shape ``(m, n)``, float32 or float64 (meant for ``m > n``: the Gram is ``(n, n)``).
    rank : int
        Number of vectors wanted, ``1 <= rank <= n``.
    tail_energy : float, optional
        As in :func:`left_singular_vectors`.
    mixed : bool, default False
        As in :func:`left_singular_vectors`.

    Returns
    -------
    (V, s2) : tuple of Tensor
        ``V`` of shape ``(n, r)`` with orthonormal columns in ``matrix.dtype`` and the squared
        singular values in decreasing order, as float64. ``M V V^T`` is the orthogonal
        projection of ``M`` on those directions; ``M V`` holds its left factor.
    """
    values, vectors = _eigh_of_gram(matrix, False, rank, mixed)  # (n,), (n, n)
    if tail_energy is not None:
        rank = max(1, select_rank(values, rank, tail_energy))
    return vectors[:, :rank].to(matrix.dtype), values


# --------------------------------------------------------------------------------------------
# Mode products and mode Gram matrices of contiguous tensors, without unfolding copies.
# --------------------------------------------------------------------------------------------
def _split(shape: Sequence[int], mode: int) -> tuple[int, int, int]:
    """``(prod(shape[:mode]), shape[mode], prod(shape[mode + 1:]))``."""
    return math.prod(shape[:mode]), int(shape[mode]), math.prod(shape[mode + 1 :])


def mode_multiply(
    tensor: torch.Tensor, matrix: torch.Tensor, mode: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``tensor ×_mode matrix`` as a contiguous tensor, without permuting ``tensor``.

    Same result as :func:`mode_product` (``matrix`` of shape ``(m, n)`` with ``n`` the size
    of mode ``mode``), computed as one matrix product (first or last mode) or one batched
    product over the leading modes, so no copy of ``tensor`` is made when it is contiguous.
    ``out``, a flat contiguous buffer of at least the result's size (same dtype and device,
    not overlapping ``tensor``), receives the result in its leading elements: reusing a buffer
    saves the page faults of fresh memory on large tensors.
    """
    shape = tuple(tensor.shape)
    before, n, after = _split(shape, mode)
    rows = matrix.shape[0]
    out_shape = (*shape[:mode], rows, *shape[mode + 1 :])
    x = tensor.contiguous()
    target = None if out is None else out[: before * rows * after]
    if after == 1:
        # (before, n) @ (n, m) -> (before, m)
        o = None if target is None else target.view(before, rows)
        result = torch.mm(x.reshape(before, n), matrix.mT, out=o)
    elif before == 1:
        # (m, n) @ (n, after) -> (m, after)
        o = None if target is None else target.view(rows, after)
        result = torch.mm(matrix, x.reshape(n, after), out=o)
    else:
        # (m, n) @ (before, n, after) -> (before, m, after)
        o = None if target is None else target.view(before, rows, after)
        result = torch.matmul(matrix, x.reshape(before, n, after), out=o)
    return result.reshape(out_shape)


def mode_gram(tensor: torch.Tensor, mode: int, *, mixed: bool = False) -> torch.Tensor:
    """``unfold(tensor, mode) @ unfold(tensor, mode).T`` in float64, without the unfolding.

    Blocks of the leading modes are copied (a block at a time) into ``(n, block)`` matrices
    whose products are summed in float64; with ``mixed`` (float32 ``tensor`` only) each
    block's product is computed in float32, else in float64.
    """
    before, n, after = _split(tuple(tensor.shape), mode)
    x = tensor.contiguous().reshape(before, n, after)
    mixed = mixed and tensor.dtype == torch.float32
    budget = MIXED_GRAM_BLOCK_ELEMENTS if mixed else GRAM_BLOCK_ELEMENTS
    gram = torch.zeros((n, n), dtype=torch.float64, device=tensor.device)
    if before == 1:
        matrix = x.reshape(n, after)
        return _gram_mixed(matrix, rows=True) if mixed else _gram(matrix, rows=True)
    step = max(1, budget // (n * after))
    for start in range(0, before, step):
        block = x[start : start + step].transpose(0, 1).reshape(n, -1)  # (n, b * after)
        if not mixed:
            block = block.to(torch.float64)
        gram += (block @ block.mT).to(torch.float64)
    return gram


def mode_left_singular_vectors(
    tensor: torch.Tensor,
    mode: int,
    rank: int,
    *,
    mixed: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of ``unfold(tensor, mode)``, shape ``(n, rank)``.

    The same vectors as ``left_singular_vectors(unfold(tensor, mode), rank)[0]`` (that path is
    taken when the mode is longer than the other modes together, or when the randomized range
    finder applies); otherwise the mode's Gram matrix (:func:`mode_gram`) is eigendecomposed
    without copying the unfolding.
    """
    before, n, after = _split(tuple(tensor.shape), mode)
    rest = before * after
    if n > rest or (min(n, rest) > RANDOMIZED_MIN_SIDE and 8 * rank <= min(n, rest)):
        vectors, _ = left_singular_vectors(
            unfold(tensor, mode), rank, generator=generator, mixed=mixed
        )
        return vectors
    values, vectors = _descending_eigh(mode_gram(tensor, mode, mixed=mixed))  # (n,), (n, n)
    if mixed and tensor.dtype == torch.float32 and _needs_float64(values, rank):
        values, vectors = _descending_eigh(mode_gram(tensor, mode, mixed=False))
    return vectors[:, :rank].to(tensor.dtype)


# --------------------------------------------------------------------------------------------
# Safe symmetric positive semi-definite solve.
# --------------------------------------------------------------------------------------------
def spd_solve_right(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``X @ gram = rhs`` for a symmetric positive semi-definite ``gram`` (R, R).

    Cholesky first; if it fails, a diagonal jitter growing from ``eps * mean(diag)`` is added;
    as a last resort the pseudo-inverse is used. A zero ``gram`` gives a zero solution. Never
    returns NaN for finite inputs.
    """
    scale = float(gram.diagonal().abs().max())
    if scale == 0.0:
        return torch.zeros_like(rhs)
    # X gram = rhs  <=>  gram X^T = rhs^T (gram symmetric)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs.mT, factor).mT
        if bool(torch.isfinite(solution).all()):
            return solution
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    jitter = torch.finfo(gram.dtype).eps * scale * gram.shape[0]
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs.mT, factor).mT
            if bool(torch.isfinite(solution).all()):
                return solution
        jitter *= 100.0
    return rhs @ torch.linalg.pinv(gram, hermitian=True)
