"""Spreading a parameter budget over layers by their calibrated output errors.

Given each layer's input statistics, every candidate (a factorization, a number of tensorized
modes, a rank) is priced by its parameter count and by the relative output error of a quick
calibrated fit (the whitened start of :mod:`factlin.decompositions.calibrated`, no refinement;
for a plain low-rank matrix the exact error curve from one whitened SVD). Keeping the layer
dense is always a candidate (error 0). The choice minimizes the *sum* of the layers' relative
output errors under the budget: greedily, each step buys the upgrade with the largest error
decrease per extra parameter among the layers' lower convex hulls (the classic
marginal-analysis solution of a multiple-choice knapsack; optimal up to one item when the
curves are convex).

With ``factorization='auto'`` the candidates are :data:`AUTO_CANDIDATES`: a plain low-rank
matrix (CP over one mode per side), and Tucker and TT over 2 and 3 modes per side. CP over
several modes is left out of ``'auto'``: a CP-ALS fit per candidate costs seconds to minutes on
real layers; ask for ``factorization='cp'`` to allocate CP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._calibrated_init import QUICK_KWARGS
from ._typing import Shape
from .decompositions.calibrated import OutputObjective, whitened_error
from .factorizations import get_factorization
from .input_stats import DEFAULT_DAMPING, InputStats, damped
from .tensorized_shape import get_tensorized_shape

__all__ = ["AUTO_CANDIDATES", "Option", "layer_options", "allocate"]

#: ``(factorization, modes per side)`` tried per layer with ``factorization='auto'``.
AUTO_CANDIDATES: tuple[tuple[str, int], ...] = (
    ("cp", 1),
    ("tucker", 2),
    ("tucker", 3),
    ("tt", 2),
    ("tt", 3),
)

#: Parameter fractions (of the dense weight) priced per candidate format.
FRACTIONS: tuple[float, ...] = (0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9)



@dataclass(frozen=True)
class Option:
    """One way to store a layer: ``factorization is None`` keeps it dense."""

    factorization: Optional[str]
    in_shape: Optional[Shape]
    out_shape: Optional[Shape]
    rank: Any
    params: int  # weight parameters
    error: float  # relative output error (estimate)

    @property
    def dense(self) -> bool:
        return self.factorization is None


def _low_rank_options(
    weight: torch.Tensor, objective: OutputObjective, damping: float
) -> list[Option]:
    """Every rank of a plain low-rank matrix, priced from one whitened SVD: the error of rank
    ``r`` is ``sqrt(sum_{i>r} s_i^2 / sum s_i^2)`` of ``W L`` (``L L^T`` the damped moment)."""
    out_features, in_features = weight.shape
    moment = damped(objective.moment[0], damping)
    lower = torch.linalg.cholesky(moment)
    values = torch.linalg.svdvals(weight.to(torch.float64) @ lower)
    energy = values.pow(2)
    total = float(energy.sum())
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[r] = sum_{i>=r}
    options = []
    per_rank = out_features + in_features + 1
    dense = out_features * in_features
    for r in range(1, len(values) + 1):
        if r * per_rank >= dense:
            break
        remaining = float(tail[r]) if r < len(values) else 0.0
        error = math.sqrt(max(remaining, 0.0) / total) if total > 0 else 0.0
        options.append(Option("cp", (in_features,), (out_features,), r, r * per_rank, error))
    return options


def _format_options(
    weight: torch.Tensor,
    objective: OutputObjective,
    factorization: str,
    n_modes: int,
    damping: float,
    fractions: Sequence[float],
) -> list[Option]:
    out_features, in_features = weight.shape
    in_shape, out_shape = get_tensorized_shape(in_features, out_features, order=n_modes)
    if n_modes > 1 and (len(in_shape) == 1 or len(out_shape) == 1):
        return []
    weight_class = get_factorization(factorization)
    dense = out_features * in_features
    options, seen = [], set()
    for fraction in fractions:
        probe = weight_class(in_shape, out_shape, fraction, device="meta")
        params = probe.num_parameters()
        if params >= dense or probe.rank in seen:
            continue
        seen.add(probe.rank)
        fitted = weight_class(in_shape, out_shape, probe.rank, dtype=weight.dtype)
        error = whitened_error(fitted, objective, damping, QUICK_KWARGS.get(factorization, {}))
        options.append(Option(factorization, in_shape, out_shape, probe.rank, params, error))
    return options


def layer_options(
    weight: torch.Tensor,
    stats: InputStats,
    centered: bool,
    candidates: Sequence[tuple[str, int]],
    *,
    damping: float = DEFAULT_DAMPING,
    fractions: Sequence[float] = FRACTIONS,
) -> list[Option]:
    """Every priced way to store the ``(out, in)`` ``weight`` under ``stats``, dense included."""
    out_features, in_features = weight.shape
    objective = OutputObjective.for_weights(weight[None], [stats], centered, damping)
    options = [Option(None, None, None, None, out_features * in_features, 0.0)]
    for factorization, n_modes in candidates:
        if factorization == "cp" and n_modes == 1:
            options += _low_rank_options(weight, objective, damping)
        else:
            options += _format_options(
                weight, objective, factorization, n_modes, damping, fractions
            )
    return options


def _lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of (params, error), by increasing params."""
    best: dict[int, Option] = {}
    for option in options:
        if option.params not in best or option.error < best[option.params].error:
            best[option.params] = option
    points = sorted(best.values(), key=lambda o: o.params)
    hull: list[Option] = []
    for point in points:
        if hull and point.error >= hull[-1].error:
            continue  # more parameters, no lower error: never worth it
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> point
            cross = (b.params - a.params) * (point.error - a.error) - (b.error - a.error) * (
                point.params - a.params
            )
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate(layers: Sequence[Sequence[Option]], budget_params: float) -> list[Option]:
    """One option per layer, minimizing the sum of errors with total ``params <= budget_params``
    (greedy on the lower convex hulls). Raises ``ValueError`` when even the smallest options
    exceed the budget."""
    hulls = [_lower_hull(options) for options in layers]
    position = [0] * len(hulls)
    total = sum(hull[0].params for hull in hulls)
    if total > budget_params:
        raise ValueError(
            f"the smallest candidates of the layers need {total:,} parameters, above the "
            f"budget's {budget_params:,.0f}"
        )
    while True:
        best, best_gain = None, 0.0
        for k, hull in enumerate(hulls):
            i = position[k]
            if i + 1 >= len(hull):
                continue
            extra = hull[i + 1].params - hull[i].params
            if total + extra > budget_params:
                continue
            gain = (hull[i].error - hull[i + 1].error) / max(extra, 1)
            if gain > best_gain:
                best, best_gain = k, gain
        if best is None:
            break
        total += hulls[best][position[best] + 1].params - hulls[best][position[best]].params
        position[best] += 1
    return [hull[i] for hull, i in zip(hulls, position)]
