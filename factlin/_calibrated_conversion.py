"""The calibrated steps of :func:`factlin.tensorize_model`: collect the layers' input statistics,
allocate a budget by output error, and fit layers sequentially (each with the already
compressed layers upstream in place).

Each step works on the converter's per-layer plans through a small protocol: a plan has
``record`` (a :class:`~factlin.LayerRecord`), ``module`` (the layer in the model being
converted), ``factorization``, ``rank``, ``bias_params`` and ``weight_params``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._linear_like import dense_weight
from .allocation import AUTO_CANDIDATES, allocate, layer_options
from .calibration import call_order, collect_input_stats, collect_paired_stats
from .errors import FactlinError
from .input_stats import DEFAULT_DAMPING, InputStats, PairedInputStats

__all__ = [
    "STATS_MEMORY_BYTES",
    "allocate_by_output_error",
    "budget_split",
    "collect_layer_stats",
    "fit_sequentially",
]

#: Input statistics (float64 ``in x in`` matrices) held at once while collecting; above it the
#: layers are split into groups, each costing one more pass over the calibration batches.
STATS_MEMORY_BYTES = 2 << 30


def collect_layer_stats(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Any],
    progress: Optional[bool],
    memory_bytes: int = STATS_MEMORY_BYTES,
) -> dict[str, InputStats]:
    """Input statistics of the layers ``names`` of ``model``, in as few passes over
    ``batches`` as ``memory_bytes`` allows (``batches`` must be re-iterable)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        in_features = int(dense_weight(model.get_submodule(name)).shape[1])
        size = 8 * in_features * (in_features + 1)
        if chunks[-1] and used + size > memory_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    stats: dict[str, InputStats] = {}
    for chunk in chunks:
        if not chunk:
            continue
        stats.update(collect_input_stats(
                model, batches, include=[re.compile(re.escape(n)) for n in chunk], progress=progress
            ))
    return stats


def budget_split(plans: Sequence[Any], budget: float) -> tuple[float, int, list[Any]]:
    """``(target, fixed, candidates)``: the parameters ``budget`` allows the matched layers,
    those of matched layers that stay dense anyway, and the plans that may be converted."""
    matched = [p for p in plans if p.matched]
    target = budget * sum(p.record.params_before for p in matched)
    fixed = sum(p.record.params_before for p in matched if p.record.skipped is not None)
    candidates = [p for p in matched if p.record.skipped is None]
    if not candidates:
        raise FactlinError(
            f"budget={budget}: none of the {len(matched)} matched linear layers can be "
            "tensorized (see the skip reasons with budget=None)"
        )
    return target, fixed, candidates


def allocate_by_output_error(
    plans: Sequence[Any],
    stats: dict[str, InputStats],
    factorization: str,
    n_modes: int,
    budget: float,
    damping: float = DEFAULT_DAMPING,
) -> None:
    """Choose each candidate plan's factorization, shapes and rank (or keep it dense) so that
    the matched layers' parameters total ``budget`` times what they have now, minimizing the
    sum of relative output errors (see :mod:`factlin.allocation`). Updates the plans."""
    target, fixed, candidates = budget_split(plans, budget)
    formats = AUTO_CANDIDATES if factorization == "auto" else ((factorization, n_modes),)
    all_options = []
    for plan in candidates:
        s = stats.get(plan.record.name)
        if s is None or s.count == 0:
            s = InputStats(plan.record.shape[1])  # never reached: every direction alike
            s.count, s.sum_outer = 1, torch.eye(plan.record.shape[1], dtype=torch.float64)
        weight = dense_weight(plan.module).detach()
        all_options.append(
            layer_options(weight, s, plan.bias_params > 0, formats, damping=damping)
        )
    biases = sum(p.bias_params for p in candidates)
    try:
        chosen = allocate(all_options, target - fixed - biases)
    except ValueError as exc:
        raise FactlinError(f"budget={budget}: {exc}; raise the budget") from None
    for plan, option in zip(candidates, chosen):
        if option.dense:
            plan.record.skipped = (
                "the budget allocation keeps it dense (its output error per parameter saved "
                "was the worst)"
            )
            continue
        plan.factorization = option.factorization
        plan.record.in_tensorized_features = option.in_shape
        plan.record.out_tensorized_features = option.out_shape
        plan.rank = option.rank
        plan.estimated_error = option.error


def fit_sequentially(
    dense: nn.Module,
    compressed: nn.Module,
    plans: Sequence[Any],
    batches: Sequence[Any],
    fit: Callable[[Any, Optional[PairedInputStats]], Optional[nn.Module]],
    swap: Callable[[Any, nn.Module], None],
    progress: Optional[bool],
    after_each: Callable[[Any], None],
) -> None:
    """Fit the plans' layers in the order the model calls them, each on the inputs it gets
    with every earlier layer already compressed (``swap`` puts a fitted layer in place in
    ``compressed`` at once). Layers that receive the very same input tensor (e.g. the query,
    key and value projections) are fitted together from one pass. Layers the calibration never
    reaches are fitted last, data-free (``fit(plan, None)``).

    Cost: two forward passes (dense and compressed) over the batches per group of layers;
    memory: three ``in x in`` float64 matrices per layer of the group being fitted."""
    by_name = {p.record.name: p for p in plans}
    dense_layers = {name: dense.get_submodule(name) for name in by_name}
    first = next(iter(batches))
    groups = call_order(dense, first, dense_layers)
    reached = {name for group in groups for name in group}
    for group in groups:
        paired = collect_paired_stats(dense, compressed, batches, group, progress)
        for name in group:
            plan = by_name[name]
            stats = paired[name]
            new = fit(plan, stats if stats.count > 0 else None)
            if new is not None:
                swap(plan, new)
            after_each(plan)
    for name, plan in by_name.items():
        if name not in reached:
            new = fit(plan, None)
            if new is not None:
                swap(plan, new)
            after_each(plan)


def dense_reference(model: nn.Module, inplace: bool) -> nn.Module:
    """The dense model sequential conversion compares against: ``model`` itself when the
    conversion works on a copy, else a copy taken before anything changes."""
    return copy.deepcopy(model) if inplace else model
