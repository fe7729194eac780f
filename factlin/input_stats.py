"""Streaming statistics of a linear layer's inputs: count, mean and second moment.

A calibrated conversion (see :mod:`factlin.decompositions.calibrated`) fits a factorized weight
``W_hat`` so that the layer's *outputs* on real inputs change as little as possible:

``E ||(W - W_hat) x||^2 = tr((W - W_hat) C (W - W_hat)^T)``

with ``C`` the second moment of the inputs ``x`` (their covariance once the bias absorbs the
mean, see :meth:`InputStats.moment`). :class:`InputStats` accumulates what that needs, in
float64, over any number of batches, and merges across batches, processes or data sets.

:class:`PairedInputStats` also keeps the cross moment between a layer's inputs in the dense model
and in a partly compressed one, for sequential conversion (:func:`factlin.tensorize_model` with
``sequential=True``).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .errors import FactlinError, InputError, ShapeError, describe

__all__ = ["DEFAULT_DAMPING", "InputStats", "PairedInputStats", "damped"]

#: Relative damping added to the diagonal of a second moment before it is factored:
#: ``C + damping * mean(diag(C)) * I``. It keeps every solve well-posed when ``C`` is rank
#: deficient (fewer calibration rows than features, dead or constant features) while changing
#: the objective only in directions that carry less than ~1% of the average input energy.
DEFAULT_DAMPING = 0.01


def _check_features(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise TypeError(f"in_features={describe(value)}: expected an int >= 1")
    return int(value)


def _check_damping(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"damping={describe(value)}: expected a number >= 0")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise FactlinError(f"damping={value}: expected a finite number >= 0")
    return value


def damped(matrix: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``matrix + damping * mean(diag(matrix)) * I`` (the identity when ``matrix`` is zero).

    ``matrix`` is a symmetric positive semi-definite ``(n, n)`` (or ``(..., n, n)``) tensor; the
    result is positive definite for any ``damping > 0``.
    """
    damping = _check_damping(damping)
    n = matrix.shape[-1]
    scale = torch.diagonal(matrix, dim1=-2, dim2=-1).mean(-1).clamp_min(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    return matrix + (damping * scale)[..., None, None] * eye


class InputStats:
    """Count, sum and sum of outer products of a layer's input rows, in float64.

    Parameters
    ----------
    in_features : int
        The last dimension of the inputs.
    device : torch.device or str, optional
        Where the sums live (default: CPU). :meth:`update` moves inputs there.

    Attributes
    ----------
    in_features : int
    count : int
        Number of rows seen (every leading index of an input ``(*, in_features)`` is a row).
    sum : Tensor
        ``(in_features,)``, float64: the sum of the rows.
    sum_outer : Tensor
        ``(in_features, in_features)``, float64: ``sum_i x_i x_i^T``.

    Examples
    --------
    >>> stats = InputStats(4)
    >>> stats.update(torch.randn(10, 4)); stats.update(torch.randn(3, 7, 4))
    >>> stats.count, tuple(stats.second_moment.shape)
    (31, (4, 4))
    """

    def __init__(self, in_features: int, *, device: Optional[torch.device | str] = None) -> None:
        self.in_features = _check_features(in_features)
        self.count = 0
        self.sum = torch.zeros(self.in_features, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(
            self.in_features, self.in_features, dtype=torch.float64, device=device
        )

    # ---- building ----------------------------------------------------------------------------
    @classmethod
    def from_inputs(cls, x: torch.Tensor, name: str = "calibration") -> InputStats:
        """Statistics of one tensor of inputs ``(*, in_features)``."""
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            raise TypeError(
                f"{name}={describe(x)}: expected a tensor of inputs (*, in_features) or "
                "an InputStats"
            )
        stats = cls(int(x.shape[-1]), device=x.device)
        stats.update(x, name=name)
        return stats

    def update(self, x: torch.Tensor, name: str = "x") -> None:
        """Add the rows of ``x`` (shape ``(*, in_features)``).

        Raises
        ------
        TypeError
            If ``x`` is not a floating-point tensor.
        ValueError
            If its last dimension is not ``in_features``, or it holds NaN or inf.
        """
        rows = self._rows(x, name)
        if rows.shape[0] == 0:
            return
        self.count += int(rows.shape[0])
        self.sum += rows.sum(0)
        self.sum_outer += rows.mT @ rows  # (in, rows) @ (rows, in)

    def _rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}={describe(x)}: expected a tensor (*, {self.in_features})")
        if not x.is_floating_point():
            raise TypeError(f"{name} has dtype {x.dtype}: expected a floating-point tensor")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(
                f"{name} has shape {tuple(x.shape)}: expected (*, {self.in_features}), the "
                "layer's in_features"
            )
        rows = x.detach().reshape(-1, self.in_features).to(self.sum.device, torch.float64)
        if not torch.isfinite(rows).all():
            raise InputError(f"{name} contains NaN or inf values")
        return rows

    def merge(self, other: InputStats) -> InputStats:
        """A new :class:`InputStats` holding the rows of both (neither is modified)."""
        if not isinstance(other, InputStats):
            raise TypeError(f"other={describe(other)}: expected an InputStats")
        if other.in_features != self.in_features:
            raise ShapeError(
                f"cannot merge statistics of {other.in_features} features into statistics of "
                f"{self.in_features} features"
            )
        merged = InputStats(self.in_features, device=self.sum.device)
        merged.count = self.count + other.count
        merged.sum = self.sum + other.sum.to(self.sum.device)
        merged.sum_outer = self.sum_outer + other.sum_outer.to(self.sum.device)
        return merged

    __add__ = merge

    # ---- moments -----------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """``(in_features,)`` mean row (zeros when empty)."""
        return self.sum / max(1, self.count)

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]``, ``(in_features, in_features)`` (zeros when empty)."""
        return self.sum_outer / max(1, self.count)

    @property
    def covariance(self) -> torch.Tensor:
        """``E[(x - mean)(x - mean)^T]``, symmetrized against round-off."""
        mean = self.mean
        cov = self.second_moment - torch.outer(mean, mean)
        return (cov + cov.mT) / 2

    def moment(self, centered: bool) -> torch.Tensor:
        """The matrix the calibrated objective uses: the covariance when ``centered`` (a layer
        with a bias, which absorbs the mean: see :func:`factlin.decompositions.calibrated`),
        else the second moment."""
        return self.covariance if centered else self.second_moment

    def to(self, device: torch.device | str) -> InputStats:
        """A copy on ``device``."""
        out = InputStats(self.in_features, device=device)
        out.count = self.count
        out.sum = self.sum.to(device)
        out.sum_outer = self.sum_outer.to(device)
        return out

    def __repr__(self) -> str:
        return f"InputStats(in_features={self.in_features}, count={self.count})"


class PairedInputStats:
    """Inputs of one layer in two models fed the same batches: the dense model (``x``) and a
    partly compressed one (``x'``), with the cross moment ``sum x x'^T``.

    Sequential conversion fits ``E ||W x + b - W_hat x' - b_hat||^2``, which needs the moments
    of ``x'``, the cross moment and the mean of ``x``.

    Attributes
    ----------
    dense, compressed : InputStats
        Statistics of ``x`` and of ``x'``.
    sum_cross : Tensor
        ``(in_features, in_features)``, float64: ``sum_i x_i x'_i^T``.
    """

    def __init__(self, in_features: int, *, device: Optional[torch.device | str] = None) -> None:
        self.dense = InputStats(in_features, device=device)
        self.compressed = InputStats(in_features, device=device)
        self.sum_cross = torch.zeros_like(self.dense.sum_outer)

    @property
    def in_features(self) -> int:
        return self.dense.in_features

    @property
    def count(self) -> int:
        return self.dense.count

    def update(self, x: torch.Tensor, x_compressed: torch.Tensor, name: str = "x") -> None:
        """Add matching rows of the two models' inputs (same shapes)."""
        if x.shape != x_compressed.shape:
            raise ShapeError(
                f"{name}: the dense model's input {tuple(x.shape)} and the compressed model's "
                f"{tuple(x_compressed.shape)} differ; both models must see the same batches"
            )
        rows = self.dense._rows(x, name)
        rows_c = self.compressed._rows(x_compressed, name)
        self.dense.count += int(rows.shape[0])
        self.dense.sum += rows.sum(0)
        self.dense.sum_outer += rows.mT @ rows
        self.compressed.count += int(rows_c.shape[0])
        self.compressed.sum += rows_c.sum(0)
        self.compressed.sum_outer += rows_c.mT @ rows_c
        self.sum_cross += rows.mT @ rows_c

    def cross_moment(self, centered: bool) -> torch.Tensor:
        """``E[x x'^T]``, or ``E[(x - m)(x' - m')^T]`` when ``centered``."""
        cross = self.sum_cross / max(1, self.count)
        if centered:
            cross = cross - torch.outer(self.dense.mean, self.compressed.mean)
        return cross

    def __repr__(self) -> str:
        return f"PairedInputStats(in_features={self.in_features}, count={self.count})"
