"""Distributed conversion: the ranks of a process group share the decompositions of a model.

:func:`factlin.tensorize_model` with ``process_group=pg`` plans the conversion on every rank as
usual (every rank holds the same model), then:

1. :func:`assign_layers` splits the layers over the ranks by estimated decomposition cost
   (:func:`estimate_fit_flops`), longest first, each to the least loaded rank (LPT: within 4/3
   of the best split; Graham, 1969);
2. each rank decomposes its share (:func:`distribute_fits`), exactly as a single process would;
3. each rank broadcasts its results: the layer records and the new modules' structure with
   ``broadcast_object_list`` (the modules on the meta device, without data), then their
   parameters, one flat buffer per dtype, with ``broadcast``;
4. every rank builds the modules it did not fit from those and swaps them all in.

So every rank ends with the same model, bitwise equal to a single-process conversion of the same
model with the same arguments (the decompositions are deterministic: seeded, no time bound,
same number of threads). With calibration, each rank collects statistics on its own batches and
:func:`all_reduce_stats` sums them before any rank is allocated or fitted: the statistics of all
the batches, up to the order of the float64 sums.

An error while fitting (not one specific to a layer, which skips it) on any rank is raised on
every rank after the exchange, so no rank waits for a broadcast that never comes.

References
----------
Graham, R. L. (1969). Bounds on multiprocessing timing anomalies. SIAM J. Appl. Math. 17(2).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .errors import FactlinError, describe
from .factorizations import resolve_rank

__all__ = [
    "all_reduce_stats",
    "assign_layers",
    "check_process_group",
    "distribute_fits",
    "estimate_fit_flops",
]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def check_process_group(name: str, value: object) -> Any:
    """``value`` if it is None or a ``torch.distributed.ProcessGroup`` this process belongs to.

    Raises
    ------
    TypeError
        Anything else (also when ``torch.distributed`` is not available).
    ValueError
        A process group this process is not a member of.
    """
    if value is None:
        return None
    if not torch.distributed.is_available():
        raise TypeError(
            f"{name}={describe(value)}: torch.distributed is not available in this build of "
            "torch; pass None"
        )
    import torch.distributed as dist

    if not isinstance(value, dist.ProcessGroup):
        raise TypeError(
            f"{name}={describe(value)}: expected a torch.distributed.ProcessGroup (e.g. "
            "torch.distributed.group.WORLD after init_process_group) or None"
        )
    if dist.get_rank(value) < 0:
        raise FactlinError(f"{name}: this process (global rank {dist.get_rank()}) is not a "
                           "member of the process group")  # fmt: skip
    return value


def check_seeded(decomposition_kwargs: dict) -> None:
    """A shared ``torch.Generator`` would make a layer's fit depend on the layers fitted before
    it in the same process: distributed results would not match a single process."""
    if isinstance(decomposition_kwargs.get("random_state"), torch.Generator):
        raise TypeError(
            "decomposition_kwargs['random_state'] is a torch.Generator, whose draws depend on "
            "the order the layers are fitted in; with process_group pass an int seed (each "
            "layer's fit then starts from it, in any process)"
        )


# --------------------------------------------------------------------------------------------
# Cost estimate and assignment
# --------------------------------------------------------------------------------------------
def estimate_fit_flops(
    factorization: str, rank: Any, in_shape: Sequence[int], out_shape: Sequence[int],
    calibrated: bool = False,
) -> float:  # fmt: skip
    """A rough FLOP count of decomposing one ``out x in`` weight, for sharing the work.

    Only the ratios between layers matter. With ``T`` the tensor's size and ``N`` its order:
    CP-ALS: ``N`` MTTKRPs of ``T * R`` per sweep; Tucker (HOOI) and TT-SVD: products and
    factorizations of unfoldings, ``T * sum(ranks)``. A calibrated fit adds the whitening and
    the refinement on the input moments, ``out * in**2``.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    size = math.prod(in_shape) * math.prod(out_shape)
    try:
        ranks, _ = resolve_rank(factorization, rank, in_shape, out_shape)
    except (TypeError, ValueError):  # an unresolvable rank fails in the fit itself
        ranks = 1
    rank_sum = sum(ranks) if isinstance(ranks, tuple) else int(ranks)
    order = len(in_shape) + len(out_shape)
    flops = float(size) * rank_sum * (order if factorization == "cp" else 1)
    if calibrated:
        flops += float(math.prod(out_shape)) * float(math.prod(in_shape)) ** 2
    return flops


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that fits each layer: the costliest layer first, each to the least loaded rank
    (ties: the lower layer index, the lower rank), so the result is the same in every process.

    Examples
    --------
    >>> assign_layers([5.0, 1.0, 4.0, 3.0], 2)  # 5 | 4, then 3 to the second, 1 to the first
    [0, 0, 1, 1]
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += costs[index]
    return owners


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def all_reduce_stats(stats: dict[str, Any], names: Sequence[str], group: Any) -> dict[str, Any]:
    """Sum every rank's :class:`factlin.InputStats` of the layers ``names`` (the same list on
    every rank): count, sum and second moment; a layer a rank saw no input of counts zero
    there. Returns new statistics, the same on every rank."""
    import torch.distributed as dist

    from .input_stats import InputStats

    out: dict[str, Any] = {}
    for name in names:
        local = stats.get(name)
        if local is None:  # this rank's batches never reached the layer: zeros
            features = _features_everywhere(name, None, group)
            local = InputStats(features)
        else:
            _features_everywhere(name, local.in_features, group)
        count = torch.tensor([float(local.count)], dtype=torch.float64, device=local.sum.device)
        merged = InputStats(local.in_features, device=local.sum.device)
        merged.sum = local.sum.clone()
        merged.sum_outer = local.sum_outer.clone()
        for tensor in (count, merged.sum, merged.sum_outer):
            dist.all_reduce(tensor, group=group)
        merged.count = int(count.item())
        out[name] = merged
    return out


def _features_everywhere(name: str, features: Optional[int], group: Any) -> int:
    """The layer's ``in_features`` as known to some rank (all that know it must agree)."""
    import torch.distributed as dist

    known: list[Optional[int]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(known, features, group=group)
    values = {f for f in known if f is not None}
    if len(values) != 1:
        raise FactlinError(
            f"calibration statistics of layer {name!r} differ in size between the ranks "
            f"({known}): every rank must convert the same model"
        )
    return values.pop()


# --------------------------------------------------------------------------------------------
# Fitting and exchanging
# --------------------------------------------------------------------------------------------
def distribute_fits(
    items: Sequence[Any],
    fit: Callable[[Any], Optional[nn.Module]],
    group: Any,
    *,
    costs: Sequence[float],
    after_each: Optional[Callable[[Any], None]] = None,
) -> list[Optional[nn.Module]]:
    """Run ``fit`` on every item, each on one rank of ``group``, and give every rank all the
    results.

    Parameters
    ----------
    items : sequence
        The layers to fit, the same on every rank and in the same order; each has ``.record``
        (a :class:`factlin.LayerRecord`, which ``fit`` fills in) and ``.module`` (the layer
        being replaced: the result is placed on its device).
    fit : callable
        ``fit(item)``: the new module, or None when the layer is skipped (the reason in its
        record).
    group : torch.distributed.ProcessGroup
    costs : sequence of float
        Estimated cost of each item (:func:`estimate_fit_flops`).
    after_each : callable, optional
        Called with each item once its result is known on this rank.

    Returns
    -------
    list
        The new module (or None) of each item, on every rank.
    """
    import torch.distributed as dist

    world, me = dist.get_world_size(group), dist.get_rank(group)
    _same_items_everywhere(items, group)
    owners = assign_layers(costs, world)
    results: list[Optional[nn.Module]] = [None] * len(items)
    error: Optional[BaseException] = None
    for index, item in enumerate(items):
        if owners[index] != me:
            continue
        try:
            results[index] = fit(item)
        except Exception as exc:  # raised on every rank after the exchange
            error = exc
            break
        if after_each is not None:
            after_each(item)
    failures: list[str] = []
    for owner in range(world):
        mine = [i for i in range(len(items)) if owners[i] == owner]
        payload: list[Any] = [None]
        if owner == me:
            payload[0] = {
                "error": None if error is None else f"{type(error).__name__}: {error}",
                "layers": [
                    (i, _record_fields(items[i].record), _skeleton(results[i])) for i in mine
                ],  # fmt: skip
            }
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, owner), group=group)
        sent = payload[0]
        if sent["error"] is not None:
            failures.append(f"rank {owner}: {sent['error']}")
        built: list[tuple[int, nn.Module]] = []
        for index, fields, skeleton in sent["layers"]:
            if owner != me:
                _set_record_fields(items[index].record, fields)
                if skeleton is not None:
                    device = items[index].module.weight.device
                    results[index] = skeleton.to_empty(device=device)
            if results[index] is not None:
                built.append((index, results[index]))
        _broadcast_tensors([m for _, m in built], dist.get_global_rank(group, owner), group)
        if owner != me and after_each is not None:
            for index, _, _ in sent["layers"]:
                after_each(items[index])
    if error is not None:
        raise error
    if failures:
        raise FactlinError("distributed conversion failed on " + "; ".join(failures))
    return results


def _same_items_everywhere(items: Sequence[Any], group: Any) -> None:
    import torch.distributed as dist

    mine = [(it.record.name, tuple(it.record.shape), getattr(it, "factorization", None),
             getattr(it, "rank", None)) for it in items]  # fmt: skip
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            raise FactlinError(
                f"rank {rank} plans to convert other layers than rank {dist.get_rank(group)} "
                f"({len(theirs)} vs {len(mine)} layers, first difference at "
                f"{next((a, b) for a, b in zip(theirs + [None], mine + [None]) if a != b)}): "
                "every rank must convert the same model with the same arguments"
            )


def _record_fields(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _set_record_fields(record: Any, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        setattr(record, key, value)


def _skeleton(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """A copy of ``module`` on the meta device: its structure and settings, no data."""
    if module is None:
        return None
    return copy.deepcopy(module).to(device="meta")


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@torch.no_grad()
def _broadcast_tensors(modules: list[nn.Module], src: int, group: Any) -> None:
    """Broadcast the parameters and buffers of ``modules`` from global rank ``src`` into the
    same-shaped modules of the other ranks: one flat buffer per dtype, on the device of the
    first such tensor of each rank (each rank may use its own device)."""
    import torch.distributed as dist

    tensors = [t for module in modules for t in _tensors(module)]
    sending = dist.get_rank() == src
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        same = [t for t in tensors if t.dtype == dtype]
        device = same[0].device
        if sending:
            flat = torch.cat([t.detach().reshape(-1).to(device) for t in same])
        else:
            flat = torch.empty(sum(t.numel() for t in same), dtype=dtype, device=device)
        dist.broadcast(flat, src=src, group=group)
        if not sending:
            offset = 0
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
