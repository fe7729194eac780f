"""TT-matrix (matrix product operator) decomposition by TT-SVD.

A weight tensor of shape ``(o_1, ..., o_d, i_1, ..., i_d)`` is reordered as
``(o_1, i_1, o_2, i_2, ..., o_d, i_d)`` and split left to right by truncated SVDs, so that

``W[o_1..o_d, i_1..i_d] = G_1[1, o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_d[:, o_d, i_d, 1]``

with core ``G_k`` of shape ``(r_{k-1}, o_k, i_k, r_k)`` and ``r_0 = r_d = 1``.

References
----------
.. [1] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011,
   Alg. 1 (TT-SVD) and §5 (TT-matrices).
.. [2] N. Halko, P.-G. Martinsson and J. A. Tropp, "Finding Structure with Randomness",
   SIAM Review 53(2), 2011.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..errors import RankError, ShapeError
from ._linalg import (
    GRAM_BLOCK_ELEMENTS,
    check_finite,
    check_ranks,
    check_tensor,
    check_tol,
    left_singular_vectors,
    mixed_precision_ok,
    reject_meta,
    relative_error,
    right_singular_vectors,
    sq_norm,
    working_dtype,
)
from .memory import check_memory

__all__ = ["TTDecomposition", "estimate_tt_svd_memory", "tt_matrix_svd", "tt_matrix_to_tensor"]

#: Below this multiple of ``sqrt(eps)`` the error from ``||W||^2 - ||last core||^2`` loses
#: digits to cancellation and is replaced by the exact one (as in :mod:`.tucker`).
_EXACT_ERROR_FACTOR = 30.0


class TTDecomposition(NamedTuple):
    """Result of :func:`tt_matrix_svd`.

    Attributes
    ----------
    cores : list of Tensor
        ``cores[k]`` of shape ``(r_k, o_{k+1}, i_{k+1}, r_{k+1})`` (0-based list).
    ranks : tuple of int
        ``(1, r_1, ..., r_{d-1}, 1)``: the bond ranks, with the two boundary 1s.
    rel_error : float
        ``||W - W_hat||_F / ||W||_F`` (0.0 when ``W`` is zero).
    """

    cores: list[torch.Tensor]
    ranks: tuple[int, ...]
    rel_error: float

    def to_tensor(self) -> torch.Tensor:
        """The full tensor, shape ``(o_1, ..., o_d, i_1, ..., i_d)``."""
        return tt_matrix_to_tensor(self.cores)


def tt_matrix_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT-matrix cores over their bonds.

    Parameters
    ----------
    cores : sequence of Tensor
        ``cores[k]`` of shape ``(r_k, o_k, i_k, r_{k+1})`` with ``r_0 = r_d = 1``.

    Returns
    -------
    Tensor
        Shape ``(o_1, ..., o_d, i_1, ..., i_d)``.
    """
    d = len(cores)
    out = cores[0].reshape(-1, cores[0].shape[-1])  # (o_1 i_1, r_1)
    for core in cores[1:]:
        # (prefix, r_{k-1}) @ (r_{k-1}, o_k i_k r_k) -> (prefix o_k i_k, r_k)
        out = (out @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    interleaved = [size for core in cores for size in core.shape[1:3]]
    perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    return out.reshape(interleaved).permute(perm)


def _full_ranks(sizes: Sequence[int]) -> tuple[int, ...]:
    """Largest useful bond ranks ``min(prod_{j<=k} n_j, prod_{j>k} n_j)`` (boundary 1s)."""
    total = math.prod(sizes)
    ranks = [1]
    for k in range(1, len(sizes)):
        left = math.prod(sizes[:k])
        ranks.append(min(left, total // left))
    return (*ranks, 1)


def estimate_tt_svd_memory(
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    ranks: Sequence[int] | None,
    itemsize: int,
) -> int:
    """Peak working memory of :func:`tt_matrix_svd`, in bytes, from shapes and ranks alone.

    ``ranks=None`` (tolerance only) assumes the full bond ranks. Counts the interleaved copy
    with the first remainder (or the upcast input while the copy is made), or, when the error
    is recomputed from the rebuilt tensor, the reconstruction and the difference (each at most
    the tensor's size, three in all), the cores, and the float64 Gram matrix of the largest
    step with the blocks it is accumulated from.
    """
    sizes = [int(o) * int(i) for o, i in zip(out_shape, in_shape)]
    numel = math.prod(sizes)
    bonds = _full_ranks(sizes) if ranks is None else tuple(int(r) for r in ranks)
    cores = sum(bonds[k] * sizes[k] * bonds[k + 1] for k in range(len(sizes)))
    gram = 0
    for k in range(len(sizes) - 1):
        rows = bonds[k] * sizes[k]
        cols = math.prod(sizes[k + 1 :])
        gram = max(gram, min(rows, cols) ** 2)
    gram += 2 * min(numel, GRAM_BLOCK_ELEMENTS)
    return (3 * numel + cores) * int(itemsize) + 8 * gram


def _check_shape(name: str, value: object) -> tuple[int, ...]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name}={value!r}: expected a tuple of positive ints")
    if len(value) == 0:
        raise ShapeError(f"{name}=(): expected a non-empty tuple of positive ints")
    return check_ranks(name, value, len(value))


def tt_matrix_svd(
    tensor: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    ranks: Sequence[int] | None = None,
    *,
    rel_tol: float | None = None,
    memory_limit_bytes: int | None = None,
) -> TTDecomposition:
    """TT-matrix decomposition of a tensorized weight by TT-SVD.

    Parameters
    ----------
    tensor : Tensor
        Shape ``(*out_shape, *in_shape)``; float16/bfloat16 are computed in float32 and cast
        back.
    out_shape, in_shape : tuple of int
        The same number ``d`` of modes each (pad the shorter one with 1s).
    ranks : tuple of int, optional
        ``(1, r_1, ..., r_{d-1}, 1)``. Without ``rel_tol`` the cores have exactly these ranks
        (a bond larger than the rank available at its step gets zero slices). With ``rel_tol``
        they are upper bounds.
    rel_tol : float, optional
        Relative tolerance ``eps``: each step keeps the smallest rank whose discarded energy is
        at most ``delta^2`` with ``delta = eps ||W||_F / sqrt(d - 1)``, so that
        ``||W - W_hat||_F <= eps ||W||_F`` when ``ranks`` is not given. The spectra come
        from float64 Gram matrices, which cannot resolve singular values below about
        ``1e-8 s_max``: a tolerance under ``1e-7`` may keep rounding-noise directions (larger
        ranks than needed; the bound still holds).
    memory_limit_bytes : int, optional
        Refuse to start if the estimated working memory exceeds this (default: see
        :mod:`factlin.decompositions.memory`).

    Returns
    -------
    TTDecomposition
        ``(cores, ranks, rel_error)`` in the dtype and on the device of ``tensor``.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If neither ``ranks`` nor ``rel_tol`` is given, on shapes or ranks that do not fit,
        NaN/inf input, or when the memory estimate exceeds the limit
        (:class:`~.memory.MemoryLimitError`).

    Notes
    -----
    With fixed ranks and a float32 tensor (in a safe range) the Gram matrices are accumulated
    in float64 from float32 block products (the error is that of the float64 route to within
    1e-6, measured 1e-8 on flat and decaying spectra; a split that discards below ``1e-6`` of
    its energy recomputes its Gram with float64 blocks); with ``rel_tol`` they come from
    float64 blocks. The last split of a tall matrix keeps its leading right singular vectors
    ``V`` (last core ``V^T``, previous core ``M V``), with no QR and no ``U^T M``. The error is
    ``sqrt(||W||^2 - ||W_hat||^2) / ||W||`` (an orthogonal projection), recomputed from the
    rebuilt tensor for float64 inputs, with ``rel_tol``, and when it is below
    ``30 sqrt(eps)``.

    References
    ----------
    .. [1] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.

    Examples
    --------
    >>> w = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # out (2, 3), in (4, 5)
    >>> tt = tt_matrix_svd(w, (2, 3), (4, 5), rel_tol=0.0)
    >>> tt.ranks, [tuple(c.shape) for c in tt.cores], tt.rel_error < 1e-12
    ((1, 8, 1), [(1, 2, 4, 8), (8, 3, 5, 1)], True)
    """
    check_tensor(tensor, min_ndim=2)
    out_shape = _check_shape("out_shape", out_shape)
    in_shape = _check_shape("in_shape", in_shape)
    d = len(out_shape)
    if len(in_shape) != d:
        raise ShapeError(
            f"out_shape={out_shape} and in_shape={in_shape} have {d} and {len(in_shape)} modes: "
            "expected the same number (pad the shorter one with 1s)"
        )
    if tuple(tensor.shape) != (*out_shape, *in_shape):
        raise ShapeError(
            f"tensor has shape {tuple(tensor.shape)}: expected (*out_shape, *in_shape) = "
            f"{(*out_shape, *in_shape)}"
        )
    if ranks is None and rel_tol is None:
        raise RankError("tt_matrix_svd needs ranks=(1, r_1, ..., 1), rel_tol=eps, or both")
    if ranks is not None:
        ranks = check_ranks("ranks", ranks, d + 1)
        if ranks[0] != 1 or ranks[-1] != 1:
            raise RankError(f"ranks={ranks}: expected boundary ranks r_0 = r_d = 1")
    if rel_tol is not None:
        rel_tol = check_tol("rel_tol", rel_tol)
    dtype = working_dtype(tensor.dtype)
    check_memory(
        estimate_tt_svd_memory(out_shape, in_shape, ranks, dtype.itemsize),
        what=(
            f"tt_matrix_svd(out_shape={out_shape}, in_shape={in_shape}, ranks={ranks}, "
            f"dtype={dtype})"
        ),
        advice="Lower the ranks or raise rel_tol.",
        limit_bytes=memory_limit_bytes,
        device=tensor.device,
    )
    reject_meta(tensor)
    norm_sq = sq_norm(tensor)  # finite exactly when every entry is (unless float64 overflows)
    if not math.isfinite(norm_sq):
        check_finite(tensor)

    sizes = [o * i for o, i in zip(out_shape, in_shape)]
    caps = _full_ranks(sizes) if ranks is None else ranks
    # (o_1..o_d, i_1..i_d) -> (o_1, i_1, ..., o_d, i_d), a contiguous copy
    perm = [j for k in range(d) for j in (k, d + k)]
    x = tensor.to(dtype).permute(perm).contiguous()
    tail = None
    if rel_tol is not None:
        tail = rel_tol**2 * norm_sq / (d - 1) if d > 1 else 0.0
    # fixed ranks: float32 Gram blocks summed in float64 (tolerances keep float64 spectra)
    mixed = tail is None and mixed_precision_ok(x, norm_sq)
    exact_error = dtype == torch.float64 or not mixed

    exact_shapes = ranks is not None and rel_tol is None
    cores: list[torch.Tensor] = []
    bonds = [1]
    remainder = x.reshape(-1)
    del x  # the remainders are all that is needed from here on
    kept_sq: float | None = None  # ||W_hat||^2 when the last split is done from the right
    for k in range(d - 1):
        rows = bonds[-1] * sizes[k]
        matrix = remainder.reshape(rows, -1)  # (r_{k} o_k i_k, rest)
        wanted = caps[k + 1]
        if k == d - 2 and matrix.shape[1] < rows and wanted <= matrix.shape[1]:
            # last split of a tall matrix: W_hat = M V V^T with V the leading right singular
            # vectors (orthonormal from the Gram's eigh), so no QR and no U^T M are needed
            right, _ = right_singular_vectors(matrix, wanted, tail_energy=tail, mixed=mixed)
            basis = matrix @ right  # (rows, r)
            remainder = right.mT  # (r, rest)
            kept_sq = sq_norm(basis)
        else:
            basis, _ = left_singular_vectors(
                matrix, min(wanted, rows), tail_energy=tail, mixed=mixed
            )
            remainder = basis.mT @ matrix  # (r, rest)
        del matrix
        r = basis.shape[1]
        if exact_shapes and r < wanted:  # exact shapes: zero slices
            basis = torch.cat([basis, basis.new_zeros(rows, wanted - r)], dim=1)
            remainder = torch.cat(
                [remainder, remainder.new_zeros(wanted - r, *remainder.shape[1:])]
            )
            r = wanted
        cores.append(basis.reshape(bonds[-1], out_shape[k], in_shape[k], r))
        bonds.append(r)
    cores.append(remainder.reshape(bonds[-1], out_shape[-1], in_shape[-1], 1))
    bonds.append(1)

    # W_hat is W projected orthogonally (orthonormal left cores, and V V^T on the right when
    # the last split is done so): ||W - W_hat||^2 = ||W||^2 - ||W_hat||^2
    if kept_sq is None:
        kept_sq = sq_norm(remainder)
    rel_error = math.sqrt(max(norm_sq - kept_sq, 0.0) / norm_sq) if norm_sq > 0 else 0.0
    if exact_error or rel_error < _EXACT_ERROR_FACTOR * math.sqrt(torch.finfo(dtype).eps):
        reference = tensor.to(dtype)
        rel_error = relative_error(reference, tt_matrix_to_tensor(cores), norm_sq)
    return TTDecomposition(
        cores=[c.to(tensor.dtype) for c in cores],
        ranks=tuple(bonds),
        rel_error=float(rel_error),
    )
