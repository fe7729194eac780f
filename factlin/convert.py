"""Whole-model conversion: every matching ``nn.Linear`` to a :class:`FactorizedLinear`, and back.

:func:`tensorize_model` walks a model, picks the linear layers to compress (by qualified name and
size), chooses each layer's rank (one rank for all, a per-layer mapping, a parameter budget for
the whole model, or an error tolerance), decomposes each chosen weight with
:meth:`FactorizedLinear.from_linear` and swaps the new modules in. Every decision is written down
in a :class:`ConversionReport`: one :class:`LayerRecord` per linear layer, converted or skipped
with the reason. :func:`untensorize_model` puts plain ``nn.Linear`` layers back. Hugging Face's
``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layers, weight stored transposed) is
converted like ``nn.Linear`` and comes back as a ``Conv1D`` (see :mod:`factlin._linear_like`).

Layers are named by their qualified names as in ``model.named_modules()`` (``'encoder.0.fc'``);
a module registered under several names is converted once and the new module is put under every
name. Patterns in ``include``, ``exclude`` and rank mappings are shell-style globs matched against
the whole name with :func:`fnmatch.fnmatchcase` (``'*'`` also matches dots: ``'encoder.*'`` is
every layer under ``encoder``), or compiled regular expressions (``re.compile(...)``), which must
match the whole name (:meth:`re.Pattern.fullmatch`).
"""

from __future__ import annotations

import copy
import math
import numbers
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, TextIO, Union

import torch
from torch import nn

from ._calibrated_conversion import (
    allocate_by_output_error,
    budget_split,
    collect_layer_stats,
    dense_reference,
    fit_sequentially,
)
from ._calibrated_init import check_calibration_kwargs
from ._linear_like import dense_weight, is_linear_like, kind_of
from ._patterns import NameMatcher, Pattern, Patterns, matches, pattern_str
from ._typing import RankSpec, Shape
from ._validation import check_bool, check_implementation, check_int
from .calibration import calibration_batches
from .distributed import (
    all_reduce_stats,
    check_process_group,
    check_seeded,
    distribute_fits,
    estimate_fit_flops,
)
from .errors import FactlinError, RankError, describe
from .factorizations import normalize_factorization, resolve_rank
from .input_stats import InputStats, PairedInputStats
from .layer import FactorizedLinear, SubFactorizedLinear
from .rank import validate_rank
from .refine import DEFAULT_REFINE_LR, check_refine_args, refine_converted
from .report import ConversionReport, LayerRecord, rank_str
from .tensorized_shape import get_tensorized_shape

__all__ = [
    "ConversionReport",
    "LayerRecord",
    "tensorize_model",
    "untensorize_model",
    "DEFAULT_MIN_FEATURES",
]

#: A rank for every layer, or a mapping from layer names / patterns to ranks.
RankArg = Union[RankSpec, Mapping[Pattern, RankSpec]]

#: Default ``min_features``: layers with ``min(in_features, out_features)`` below it are kept.
DEFAULT_MIN_FEATURES = 16

#: Factorizations that support ``tolerance`` (see :func:`tensorize_model`).
_TOLERANCE_FACTORIZATIONS = ("tt", "tucker")
#: Allowed relative deviation of the parameter total from ``budget``.
_BUDGET_SLACK = 0.05
#: With ``progress=None``, start reporting after this many seconds.
_PROGRESS_DELAY_S = 2.0


# --------------------------------------------------------------------------------------------
# Argument checks (all before any work)
# --------------------------------------------------------------------------------------------
class _RankRule:
    """One rank for every layer, or the first matching entry of a mapping."""

    def __init__(self, rank: object) -> None:
        self.mapping: Optional[dict[Pattern, RankSpec]] = None
        self.rank: Optional[RankSpec] = None
        if isinstance(rank, Mapping):
            if not rank:
                raise RankError("rank={}: a rank mapping must have at least one entry")
            self.mapping = {}
            for key, value in rank.items():
                if not isinstance(key, (str, re.Pattern)):
                    raise TypeError(
                        f"rank mapping key {describe(key)}: expected a layer name, a glob "
                        "string or a compiled regex"
                    )
                try:
                    self.mapping[key] = validate_rank(value)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"rank mapping entry {pattern_str(key)}: {exc}") from None
        else:
            self.rank = validate_rank(rank)

    @property
    def is_default(self) -> bool:
        return self.mapping is None and self.rank == "same"

    def lookup(self, names: Sequence[str]) -> Optional[RankSpec]:
        """The rank for a layer known by ``names``: exact names first, then patterns in order."""
        if self.mapping is None:
            return self.rank
        for key, value in self.mapping.items():
            if isinstance(key, str) and key in names:
                return value
        for key, value in self.mapping.items():
            if any(matches(key, n) for n in names):
                return value
        return None


def _check_fraction(name: str, value: object, *, upper: Optional[float]) -> float:
    expected = "a number > 0" if upper is None else f"a number in [0, {upper})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={describe(value)}: expected {expected}")
    value = float(value)
    bad = not math.isfinite(value) or (value <= 0 if upper is None else not 0 <= value < upper)
    if bad:
        raise FactlinError(f"{name}={value}: expected {expected}")
    return value


# --------------------------------------------------------------------------------------------
# Walking the model
# --------------------------------------------------------------------------------------------
def _module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_groups(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every ``nn.Linear`` or Hugging Face ``Conv1D`` (subclasses included) with all the names
    it is registered under."""
    groups: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_linear_like(module):
            groups.setdefault(id(module), (module, []))[1].append(name)
    return list(groups.values())


def _parameter_owners(model: nn.Module) -> dict[int, set[str]]:
    """``id(parameter)`` to the names of the modules holding it (tied weights have several)."""
    owners: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    return {pid: {names[m] for m in mods} for pid, mods in owners.items()}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@lru_cache(maxsize=4096)
def _resolved(factorization: str, rank: RankSpec, in_shape: Shape, out_shape: Shape) -> Any:
    """``(ranks, weight parameter count)`` for one layer, without allocating (cached)."""
    return resolve_rank(factorization, rank, in_shape, out_shape)


# --------------------------------------------------------------------------------------------
# Planning one layer
# --------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    module: nn.Module
    record: LayerRecord
    matched: bool = False  # passed the include/exclude filters
    rank: Any = None  # what to pass to from_linear (resolved where possible)
    bias_params: int = 0
    factorization: str = ""  # of this layer ('auto' chooses per layer)
    estimated_error: Optional[float] = None  # the budget allocation's estimate

    @property
    def weight_params(self) -> int:
        return self.record.shape[0] * self.record.shape[1]

    @property
    def in_shape(self) -> Shape:
        return self.record.in_tensorized_features  # type: ignore[return-value]

    @property
    def out_shape(self) -> Shape:
        return self.record.out_tensorized_features  # type: ignore[return-value]


def _plan_layer(
    module: nn.Module,
    names: list[str],
    *,
    factorization: str,
    rank_rule: _RankRule,
    n_modes: int,
    min_features: int,
    includes: Optional[NameMatcher],
    excludes: Optional[NameMatcher],
    owners: dict[int, set[str]],
    check_size: bool,
) -> _Plan:
    weight = module.weight  # the parameter (for ties); dense_weight(module) is (out, in)
    out_features, in_features = (int(n) for n in dense_weight(module).shape)
    before = _module_params(module)
    record = LayerRecord(
        name=names[0],
        aliases=tuple(names[1:]),
        shape=(out_features, in_features),
        params_before=before,
        params_after=before,
    )
    plan = _Plan(
        module, record, bias_params=before - out_features * in_features,
        factorization=factorization,
    )  # fmt: skip

    def skip(reason: str) -> _Plan:
        record.skipped = reason
        return plan

    if kind_of(module) is None:
        return skip(
            f"{type(module).__name__} is a subclass of "
            f"{'nn.Linear' if isinstance(module, nn.Linear) else 'Conv1D'}; only plain "
            "nn.Linear and Conv1D layers are converted (a subclass or its owner may use the "
            "weight directly)"
        )
    if includes is not None and includes.first_match(names) is None:
        return skip("not matched by include")
    if excludes is not None:
        pattern = excludes.first_match(names)
        if pattern is not None:
            return skip(f"matched exclude pattern {pattern_str(pattern)}")
    plan.matched = True
    tied = sorted(owners.get(id(weight), set()) - set(names))
    if tied:
        return skip(f"its weight is shared with {', '.join(map(repr, tied))}; converting it "
                    "would untie them")  # fmt: skip
    if min(in_features, out_features) < min_features:
        return skip(f"min(in, out)={min(in_features, out_features)} < min_features={min_features}")
    in_shape, out_shape = get_tensorized_shape(in_features, out_features, order=n_modes)
    if n_modes > 1 and len(in_shape) == 1:
        return skip(
            f"{out_features}x{in_features} cannot be folded into 2 or more modes of size >= 2 "
            "on both sides (a prime or too small size)"
        )
    record.in_tensorized_features, record.out_tensorized_features = in_shape, out_shape
    rank = rank_rule.lookup(names)
    if rank is None:
        return skip("no entry of the rank mapping matches its name")
    plan.rank = rank
    if check_size:
        resolved, count = _resolved(factorization, rank, in_shape, out_shape)
        if isinstance(rank, float) and rank < 1 and count >= plan.weight_params:
            return skip(
                f"at rank={rank} the {factorization} weight would have {count:,} parameters, "
                f"not fewer than the dense {plan.weight_params:,}"
            )
        plan.rank = resolved
    return plan


# --------------------------------------------------------------------------------------------
# Budget: one fraction for every layer, then the largest layer fills the gap
# --------------------------------------------------------------------------------------------
def _apply_budget(plans: list[_Plan], factorization: str, budget: float) -> None:
    target, fixed, candidates = budget_split(plans, budget)

    def count(plan: _Plan, fraction: float) -> int:
        weights = _resolved(factorization, fraction, plan.in_shape, plan.out_shape)[1]
        if weights >= plan.weight_params:  # not smaller: the layer stays dense
            return plan.record.params_before
        return weights + plan.bias_params

    def total(fraction: float, override: Optional[tuple[_Plan, float]] = None) -> int:
        out = fixed
        for p in candidates:
            f = override[1] if override is not None and override[0] is p else fraction
            out += count(p, f)
        return out

    def closest(fn: Any, low: float, high: float) -> float:
        for _ in range(50):
            mid = (low + high) / 2
            if fn(mid) < target:
                low = mid
            else:
                high = mid
        return min((low, high), key=lambda f: abs(fn(f) - target))

    lowest = 1e-9
    fraction = closest(total, lowest, 1.0)
    # the largest layer alone closes what one common fraction cannot
    largest = max(candidates, key=lambda p: p.weight_params)
    own = closest(lambda f: total(fraction, (largest, f)), lowest, 1.0)
    reached = total(fraction, (largest, own))
    if abs(reached - target) > _BUDGET_SLACK * target:
        floor = total(lowest)
        raise FactlinError(
            f"budget={budget} asks for {target:,.0f} parameters in the matched linear layers, "
            f"but the closest reachable total is {reached:,} (the smallest is {floor:,}, with "
            f"{fixed:,} in layers that stay dense): raise the budget or lower min_features"
        )
    for p in candidates:
        f = own if p is largest else fraction
        resolved, weights = _resolved(factorization, f, p.in_shape, p.out_shape)
        if weights >= p.weight_params:
            p.record.skipped = (
                f"at the budget's fraction {f:.3g} the {factorization} weight would have "
                f"{weights:,} parameters, not fewer than the dense {p.weight_params:,}"
            )
        else:
            p.rank = resolved


# --------------------------------------------------------------------------------------------
# Tolerance: the smallest Tucker ranks allowed by the HOSVD error bound
# --------------------------------------------------------------------------------------------
def _tucker_tolerance_ranks(
    weight: torch.Tensor, in_shape: Shape, out_shape: Shape, tolerance: float
) -> tuple[int, ...]:
    """Per-mode ranks whose truncated HOSVD has relative error at most ``tolerance``.

    Truncating mode ``k`` discards the energy of the trailing singular values of the mode-``k``
    unfolding; the HOSVD error is at most the sum over modes (De Lathauwer et al., 2000,
    Property 10), so each mode may discard ``tolerance**2 * ||W||^2 / N``. HOOI then only
    lowers the error.
    """
    tensor = weight.detach().to(torch.float64).reshape(*out_shape, *in_shape)
    shape = tuple(tensor.shape)
    allowed = tolerance**2 * float(tensor.pow(2).sum()) / len(shape)
    ranks = []
    for k, size in enumerate(shape):
        unfolding = tensor.movedim(k, 0).reshape(size, -1)  # (n_k, prod of the other modes)
        energy = torch.linalg.eigvalsh(unfolding @ unfolding.T).flip(0).clamp_min(0)
        tails = (energy.sum() - energy.cumsum(0)).tolist()  # tails[r - 1]: dropped beyond r
        ranks.append(next((r + 1 for r, tail in enumerate(tails) if tail <= allowed), size))
    return tuple(ranks)


def _cap_ranks(ranks: tuple[int, ...], cap: Any) -> tuple[int, ...]:
    if isinstance(cap, int):
        return tuple(min(r, cap) for r in ranks)
    return tuple(min(r, c) for r, c in zip(ranks, cap))


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
class _Progress:
    """Lines on stderr: always (True), never (False), or once the work takes a while (None).

    Each line gives the layer's own time and, while layers remain, the elapsed time and an
    ETA: the mean wall time per layer so far (from the start of the first layer's fit) times
    the layers left.
    """

    def __init__(self, mode: Optional[bool], total: int, start: float) -> None:
        self.mode, self.total, self.start = mode, total, start
        self.stream: TextIO = sys.stderr
        self.tty = mode is None and bool(getattr(self.stream, "isatty", lambda: False)())
        self.pending_newline = False
        self.first_fit_start: Optional[float] = None  # when the first logged layer began

    def _timing(self, index: int, now: float) -> str:
        """``'elapsed 12 s, ETA 3 min 05 s'`` while layers remain, ``'total 3 min 17 s'``."""
        left = self.total - index
        if left <= 0 or index <= 0 or self.first_fit_start is None:
            return f"total {_duration(now - self.start)}"
        eta = (now - self.first_fit_start) / index * left
        return f"elapsed {_duration(now - self.start)}, ETA {_duration(eta)}"

    def _active(self) -> bool:
        if self.mode is None:
            return time.perf_counter() - self.start > _PROGRESS_DELAY_S
        return self.mode

    def layer(self, index: int, record: LayerRecord) -> None:
        now = time.perf_counter()
        if self.first_fit_start is None:  # noted even before the lines start
            self.first_fit_start = max(self.start, now - record.seconds)
        if not self._active():
            return
        what = (
            f"skipped ({record.skipped})"
            if record.skipped is not None
            else f"{record.factorization} rank {rank_str(record.rank)}, "
            f"{record.params_before:,} -> {record.params_after:,} params, "
            f"rel error {record.rel_error:.3g}, {record.seconds:.2f} s"
        )
        line = f"factlin: [{index}/{self.total}] {record.name or '(model)'}: {what}"
        timing = "; " + self._timing(index, now)
        if self.tty:  # one line, cut to 160 characters but keeping the ETA
            self.stream.write("\r\x1b[K" + line[: 160 - len(timing)] + timing)
            self.pending_newline = True
        else:
            self.stream.write(line + timing + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.pending_newline:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    """``'0.4 s'``, ``'42 s'``, ``'3 min 05 s'``, ``'1 h 02 min'``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


# --------------------------------------------------------------------------------------------
# The converters
# --------------------------------------------------------------------------------------------
def tensorize_model(
    model: nn.Module,
    rank: RankArg = "same",
    factorization: str = "cp",
    implementation: str = "auto",
    n_tensorized_modes: int = 3,
    include: Optional[Patterns] = None,
    exclude: Optional[Patterns] = None,
    min_features: int = DEFAULT_MIN_FEATURES,
    decomposition_kwargs: Optional[dict] = None,
    inplace: bool = False,
    progress: Optional[bool] = None,
    budget: Optional[float] = None,
    tolerance: Optional[float] = None,
    calibration: Optional[Any] = None,
    sequential: bool = False,
    calibration_kwargs: Optional[dict] = None,
    refine_steps: int = 0,
    refine_lr: float = DEFAULT_REFINE_LR,
    search_shapes: Optional[bool] = None,
    process_group: Optional[Any] = None,
    structure: Optional[Any] = None,
) -> tuple[nn.Module, ConversionReport]:
    """Replace the linear layers of ``model`` by factorized ones decomposed from their weights.

    Every plain ``nn.Linear`` that matches ``include``/``exclude`` and is large enough becomes a
    :class:`FactorizedLinear` built by :meth:`FactorizedLinear.from_linear`; every other module
    is left untouched. A Hugging Face ``Conv1D`` counts as an ``nn.Linear`` (its transposed
    weight is read as ``(out, in)``). A layer that cannot be tensorized usefully is kept and
    recorded as skipped, with the reason, in the report: it never stops the conversion.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it may itself be an ``nn.Linear``.
    rank : 'same', float, int, tuple of int, or mapping, default 'same'
        The rank of every converted layer (as in :class:`FactorizedLinear`), or a mapping from
        qualified layer names or patterns to ranks: an exact name wins, then the first matching
        pattern in the mapping's order; layers that no entry matches are skipped. With a float
        ``f < 1``, layers whose factorized weight would not have fewer parameters than the
        dense one are skipped. With ``tolerance``, the rank is an upper bound.
    factorization : {'cp', 'tucker', 'tt', 'auto'}, default 'cp'
        Case-insensitive, aliases accepted. ``'auto'`` (with ``budget`` and ``calibration``)
        chooses per layer among a plain low-rank matrix and Tucker and TT over 2 or 3 modes
        (:data:`factlin.allocation.AUTO_CANDIDATES`).
    implementation : {'factorized', 'reconstructed', 'auto'}, default 'auto'
        Forward implementation of the new layers.
    n_tensorized_modes : int, default 3
        Modes per side (:func:`factlin.get_tensorized_shape`); fewer when the sizes do not
        allow it. Layers that fold into a single mode although ``n_tensorized_modes > 1``
        (prime sizes) are skipped.
    include, exclude : glob string, compiled regex or list of them, optional
        Convert only layers with a name matching ``include`` (all when None), and none with a
        name matching ``exclude``. Globs use :func:`fnmatch.fnmatchcase` on the whole
        qualified name (``'*'`` also crosses dots); regexes must match the whole name. A module
        registered under several names is included when one of them matches ``include`` and
        excluded when one of them matches ``exclude``.
    min_features : int, default 16
        Layers with ``min(in_features, out_features) < min_features`` are skipped.
    decomposition_kwargs : dict, optional
        Passed to every decomposition (e.g. ``{'n_iter_max': 20}`` for CP-ALS; see
        :meth:`FactorizedLinear.from_linear`).
    inplace : bool, default False
        Modify ``model`` itself instead of a deep copy. The modules are swapped only after
        every decomposition succeeded, so an error leaves the model as it was.
    progress : bool or None, default None
        True: one line per layer on stderr; False: silent; None: silent for the first ~2
        seconds, then one line per layer (an updating line on a terminal).
    budget : float, optional
        Total parameters of the matched linear layers (weights and biases, skipped layers
        counted dense) as a fraction of what they have now. Without ``calibration``, ranks
        are chosen by giving every layer the same parameter fraction, then letting the
        largest layer close the remaining gap; the total lands within ±5% of the budget, or
        a ``ValueError`` says what can be reached. With ``calibration``, the budget is
        spread to minimize the sum of the layers' relative output errors
        (:mod:`factlin.allocation`; a layer may stay dense); the total stays at or below the
        budget. Cannot be combined with an explicit ``rank``.
    tolerance : float, optional
        Target relative Frobenius error ``eps`` in ``[0, 1)`` of each weight. Supported for
        ``'tt'`` (TT-SVD truncation, ``rel_tol``) and ``'tucker'`` (the smallest ranks allowed
        by the truncated-HOSVD error bound, refined by HOOI); both guarantee
        ``rel_error <= eps`` unless ``rank`` caps the ranks first. ``'cp'`` has no such
        rank-revealing algorithm and raises ``ValueError``. Layers whose error stays above
        ``eps`` under the rank cap, or that would not get smaller, are skipped.
    calibration : iterable of batches, or dict of str to InputStats, optional
        Real inputs of the model (see :mod:`factlin.calibration`: Tensors, tuples/lists of
        arguments or Mappings of keyword arguments; keep padding out), or statistics already
        collected (:func:`factlin.collect_input_stats`). Each layer is then fitted to its
        outputs on these inputs (:meth:`FactorizedLinear.from_linear` with ``calibration``);
        the report gives each layer's relative output error. A one-shot iterator is read
        into a list first (several passes are needed). Layers no batch reaches are fitted
        data-free (noted in the report).
    sequential : bool, default False
        With ``calibration``: convert the layers in the order the model calls them, each
        fitted on the inputs it receives with the layers before it already compressed, to
        reproduce the dense model's outputs (so later layers correct earlier errors instead
        of compounding them). Costs two forward passes over the batches per group of layers
        that share one input tensor (e.g. 4 groups per BERT block); memory: three
        ``in x in`` float64 matrices per layer of the group, never all layers' at once. With
        ``inplace=True`` the dense model is copied first (the reference).
    calibration_kwargs : dict, optional
        Options of the calibrated fits (see :meth:`FactorizedLinear.from_linear`).
    refine_steps : int, default 0
        With ``calibration``: after every layer is fitted, this many Adam steps on the
        converted layers together, over the calibration batches in turn, so that each one's
        output in the compressed model matches the dense layer's output in the dense model
        (layer-wise distillation through the compressed model; see :mod:`factlin.refine`).
        Kept only if it lowers that loss over the batches (``report.refinement`` says).
    refine_lr : float, default 1e-4
        Adam's step size for ``refine_steps``.
    search_shapes : bool or None, default None
        Choose each layer's tensorized folding by fit at its budget
        (:meth:`FactorizedLinear.from_linear`; None: for Tucker and TT, not for CP); False
        keeps the balanced folding of
        :func:`factlin.get_tensorized_shape`. Not with ``tolerance`` (its ranks belong to the
        balanced folding) or a calibrated ``budget`` (the allocation chooses).
    process_group : torch.distributed.ProcessGroup, optional
        Share the decompositions between the ranks of this group (see
        :mod:`factlin.distributed`): call on every rank with the same model and arguments;
        the layers are split by estimated cost, each rank decomposes its share and the results
        are broadcast, so every rank returns the same model, bitwise equal to a conversion in
        one process. Calibration batches are each rank's own share: their statistics are
        summed over the ranks. Not with ``sequential``. None (default): this process alone.
    structure : ConversionReport or dict, optional
        Rebuild the structure a conversion produced -- a report, its ``to_dict()``, or the
        contents of a ``factlin_config.json`` -- without decomposing: the recorded layers
        become :class:`FactorizedLinear` layers of the recorded shapes and ranks, randomly
        initialized (nothing allocated on the ``meta`` device), ready for
        ``load_state_dict``; the path of :func:`factlin.from_pretrained`. Only
        ``implementation`` and ``inplace`` apply then; a recorded layer missing from
        ``model`` or of another size raises ``ValueError`` naming both shapes.

    Returns
    -------
    model : torch.nn.Module
        The converted model (``model`` itself when ``inplace``, otherwise a copy; a new
        :class:`FactorizedLinear` when ``model`` was an ``nn.Linear`` that got converted).
    report : ConversionReport
        One :class:`LayerRecord` per ``nn.Linear`` found (converted or skipped) and totals.

    Raises
    ------
    TypeError, ValueError
        On bad arguments, before any work: an unknown factorization or implementation, a bad
        rank or rank mapping, ``budget`` together with ``rank`` or ``tolerance``,
        ``tolerance`` with CP, a budget that cannot be reached. Errors of a decomposition that
        are not about the layer itself (e.g. unknown ``decomposition_kwargs``) propagate.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    >>> small, report = tensorize_model(model, rank=0.2, factorization='tucker', progress=False)
    >>> [r.converted for r in report.layers]
    [True, False]
    """
    # ---- every check first -------------------------------------------------------------------
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={describe(model)}: expected a torch.nn.Module")
    if structure is not None:
        from .pretrained import structure_conversion

        given = [name for name, value, default in (
            ("rank", rank, "same"), ("budget", budget, None), ("tolerance", tolerance, None),
            ("include", include, None), ("exclude", exclude, None),
            ("decomposition_kwargs", decomposition_kwargs, None),
            ("calibration", calibration, None),
        ) if not (value is default or (isinstance(value, str) and value == default))]  # fmt: skip
        if given:
            raise FactlinError(
                f"structure= rebuilds the recorded layers as they are: {', '.join(given)} "
                "cannot be combined with it"
            )
        return structure_conversion(
            model, structure, implementation=check_implementation(implementation),
            inplace=check_bool("inplace", inplace),
        )  # fmt: skip
    auto = isinstance(factorization, str) and factorization.strip().lower() == "auto"
    factorization = "auto" if auto else normalize_factorization(factorization)
    sequential = check_bool("sequential", sequential)
    if search_shapes is not None:
        search_shapes = check_bool("search_shapes", search_shapes)
    refine_steps, refine_lr = check_refine_args(refine_steps, refine_lr)
    fit_options = check_calibration_kwargs(calibration_kwargs)
    given_stats = _given_stats(calibration)
    if calibration is not None and given_stats is None:
        calibration = calibration_batches(calibration, reusable=True)
    if auto and (budget is None or calibration is None):
        raise FactlinError(
            "factorization='auto' chooses each layer's format from its calibrated output "
            "errors under a parameter budget: pass budget= and calibration= too"
        )
    if calibration_kwargs is not None and calibration is None:
        raise TypeError(
            "calibration_kwargs configures calibrated fits: pass calibration= too (or drop "
            "calibration_kwargs)"
        )
    if sequential and calibration is None:
        raise FactlinError("sequential=True fits layers on calibration inputs: pass calibration=")
    if refine_steps and (calibration is None or given_stats is not None):
        raise FactlinError(
            f"refine_steps={refine_steps} trains on calibration batches: pass them as "
            "calibration= (not precomputed statistics)"
        )
    if sequential and given_stats is not None:
        raise TypeError(
            "sequential=True needs calibration batches to run through the partly compressed "
            "model, not precomputed statistics"
        )
    process_group = check_process_group("process_group", process_group)
    if process_group is not None and sequential:
        raise FactlinError(
            "sequential=True fits the layers one after another, each on the outputs of the "
            "ones before: it cannot be shared between ranks; pass process_group=None"
        )
    if calibration is not None and tolerance is not None:
        raise FactlinError(
            f"tolerance={tolerance} bounds the weight error, which a calibrated fit does not "
            "minimize: pass a rank or a budget with calibration"
        )
    implementation = check_implementation(implementation)
    n_modes = check_int("n_tensorized_modes", n_tensorized_modes, 1)
    min_features = check_int("min_features", min_features, 1)
    includes = None if include is None else NameMatcher("include", include)
    excludes = None if exclude is None else NameMatcher("exclude", exclude)
    rank_rule = _RankRule(rank)
    if decomposition_kwargs is not None and not isinstance(decomposition_kwargs, dict):
        raise TypeError(
            f"decomposition_kwargs={describe(decomposition_kwargs)}: expected a dict or None"
        )
    kwargs = dict(decomposition_kwargs or {})
    if process_group is not None:
        check_seeded(kwargs)
    inplace = check_bool("inplace", inplace)
    if progress is not None:
        check_bool("progress", progress)
    if budget is not None:
        budget = _check_fraction("budget", budget, upper=None)
        if not rank_rule.is_default:
            raise FactlinError(
                f"budget={budget} chooses every rank itself: leave rank at 'same' "
                f"(got rank={describe(rank)})"
            )
        if tolerance is not None:
            raise FactlinError(
                f"budget={budget} and tolerance={tolerance} both choose the ranks: pass one"
            )
    if tolerance is not None:
        tolerance = _check_fraction("tolerance", tolerance, upper=1.0)
        if factorization not in _TOLERANCE_FACTORIZATIONS:
            raise FactlinError(
                f"tolerance={tolerance} is not supported for factorization={factorization!r}: "
                "CP has no rank-revealing decomposition to stop at an error; use one of "
                f"{_TOLERANCE_FACTORIZATIONS}, or pick a rank or budget"
            )
        if "rel_tol" in kwargs:
            raise FactlinError(
                "pass the error target once: tolerance= or decomposition_kwargs['rel_tol'], "
                "not both"
            )

    # ---- plan ----------------------------------------------------------------------------
    start = time.perf_counter()
    # the dense model that sequential fitting and refinement compare against (unused otherwise)
    dense = dense_reference(model, inplace) if sequential or refine_steps else model
    root = model if inplace else copy.deepcopy(model)
    model_before = _module_params(root)
    owners = _parameter_owners(root)
    plans = [
        _plan_layer(
            module,
            names,
            factorization="tucker" if auto else factorization,  # 'auto': allocation decides
            rank_rule=rank_rule,
            n_modes=n_modes,
            min_features=min_features,
            includes=includes,
            excludes=excludes,
            owners=owners,
            check_size=tolerance is None,
        )
        for module, names in _linear_groups(root)
    ]
    active = [p for p in plans if p.record.skipped is None]

    # ---- input statistics ----------------------------------------------------------------
    stats: dict[str, InputStats] = {}
    if given_stats is not None:
        stats = given_stats
    elif calibration is not None and (not sequential or budget is not None):
        stats = collect_layer_stats(root, [p.record.name for p in active], calibration, progress)
        if process_group is not None:  # each rank saw its own batches
            stats = all_reduce_stats(stats, [p.record.name for p in active], process_group)

    # ---- ranks ---------------------------------------------------------------------------
    if budget is not None:
        if calibration is not None:
            allocate_by_output_error(
                plans, stats, factorization, n_modes, budget, fit_options["damping"]
            )
        else:
            _apply_budget(plans, factorization, budget)

    # ---- fit and swap --------------------------------------------------------------------
    progress_log = _Progress(progress, len(plans), start)
    active = [p for p in plans if p.record.skipped is None]
    fitter = _Fitter(
        implementation, kwargs, tolerance, fit_options, calibration is not None,
        search_shapes=search_shapes, n_modes=n_modes,
    )  # fmt: skip
    swapped: list[tuple[str, nn.Module]] = []  # (name, old module), to undo on failure

    def swap(plan: _Plan, new: nn.Module) -> None:
        nonlocal root
        for name in (plan.record.name, *plan.record.aliases):
            if name == "":
                swapped.append((name, root))
                root = new
            else:
                swapped.append((name, root.get_submodule(name)))
                _set_submodule(root, name, new)

    index = 0
    refinement: Optional[dict] = None

    def logged(plan: _Plan) -> None:
        nonlocal index
        index += 1
        progress_log.layer(index, plan.record)

    try:
        if sequential and not (len(active) == 1 and active[0].record.name == ""):
            fit_sequentially(
                dense, root, active, calibration, fitter, swap, progress, after_each=logged
            )
        else:
            new_modules: dict[int, nn.Module] = {}
            if process_group is not None:  # each rank fits a share, then all get all
                fitted = distribute_fits(
                    active, lambda plan: fitter(plan, stats.get(plan.record.name)),
                    process_group, costs=[fit_cost(p, calibration) for p in active],
                    after_each=logged,
                )  # fmt: skip
                new_modules = {id(p): m for p, m in zip(active, fitted) if m is not None}
            else:
                for plan in active:
                    new = fitter(plan, stats.get(plan.record.name))
                    if new is not None:
                        new_modules[id(plan)] = new
                    logged(plan)
            for plan in active:  # swapped only once every fit succeeded
                if id(plan) in new_modules:
                    swap(plan, new_modules[id(plan)])
        if refine_steps:
            converted = [p.record.name for p in active if p.record.skipped is None]
            batches = calibration if isinstance(calibration, Sequence) else list(calibration)
            refinement = refine_converted(
                dense, root, converted, batches, refine_steps, lr=refine_lr
            )
        fitted_ids = {id(p) for p in active}
        for plan in plans:
            if id(plan) not in fitted_ids:
                logged(plan)
    except BaseException:
        for name, old in reversed(swapped):  # leave the model as it was
            if name == "":
                root = old
            else:
                _set_submodule(root, name, old)
        raise
    finally:
        progress_log.close()
    report = ConversionReport(
        layers=[p.record for p in plans],
        seconds=time.perf_counter() - start,
        model_params_before=model_before,
        model_params_after=_module_params(root),
        refinement=refinement,
    )
    return root, report


def fit_cost(plan: _Plan, calibration: object) -> float:
    """Estimated cost of fitting ``plan`` (for sharing the fits between ranks)."""
    return estimate_fit_flops(
        plan.factorization, plan.rank, plan.in_shape, plan.out_shape, calibration is not None
    )


def _given_stats(calibration: object) -> Optional[dict[str, InputStats]]:
    """``calibration`` when it is a dict of precomputed statistics, else None."""
    if isinstance(calibration, Mapping) and calibration:
        values = list(calibration.values())
        if all(isinstance(v, InputStats) for v in values):
            return dict(calibration)
    return None


class _Fitter:
    """Decomposes one planned layer; on a layer-specific failure records the reason and
    returns None."""

    def __init__(
        self,
        implementation: str,
        kwargs: dict,
        tolerance: Optional[float],
        fit_options: dict,
        calibrated: bool,
        search_shapes: Optional[bool] = False,
        n_modes: int = 3,
    ) -> None:
        self.search_shapes = search_shapes
        self.n_modes = n_modes
        self.implementation = implementation
        self.kwargs = kwargs
        self.tolerance = tolerance
        self.fit_options = fit_options
        self.calibrated = calibrated

    def __call__(
        self, plan: _Plan, stats: Optional[InputStats | PairedInputStats]
    ) -> Optional[FactorizedLinear]:
        record, linear = plan.record, plan.module
        factorization, tolerance, kwargs = plan.factorization, self.tolerance, self.kwargs
        rank = plan.rank
        tic = time.perf_counter()
        if tolerance is not None:
            cap = _resolved(factorization, rank, plan.in_shape, plan.out_shape)[0]
            if factorization == "tt":
                kwargs = {**kwargs, "rel_tol": tolerance}
                rank = cap
            else:
                wanted = _tucker_tolerance_ranks(
                    dense_weight(linear), plan.in_shape, plan.out_shape, tolerance
                )
                rank = _cap_ranks(wanted, cap)
        if stats is not None and stats.count == 0:
            stats = None
        if self.calibrated and stats is None:
            record.note = "no calibration input reached it: fitted data-free"
        # the folding is searched unless the ranks belong to the planned one (tolerance, or a
        # budget allocation that chose folding and ranks together)
        search = self.search_shapes is not False and tolerance is None
        search = search and plan.estimated_error is None
        shapes = (
            {
                "auto_tensorize": True,
                "n_tensorized_modes": self.n_modes,
                "search_shapes": self.search_shapes,
            }
            if search
            else {
                "auto_tensorize": False,
                "in_tensorized_features": plan.in_shape,
                "out_tensorized_features": plan.out_shape,
            }
        )
        try:
            new = FactorizedLinear.from_linear(
                linear,
                rank=rank,
                **shapes,
                factorization=factorization,
                implementation=self.implementation,
                decomposition_kwargs=kwargs,
                calibration=stats,
                calibration_kwargs=self.fit_options if stats is not None else None,
            )
        except (FactlinError, RuntimeError) as exc:  # MemoryLimitError, linalg failures, ...
            record.seconds = time.perf_counter() - tic
            record.skipped = f"decomposition failed: {exc}"
            return None
        record.seconds = time.perf_counter() - tic
        info = new.decomposition_info or {}
        rel_error = info.get("rel_error")
        after = _module_params(new)
        if tolerance is not None:
            if rel_error is not None and rel_error > tolerance * (1 + 1e-9) + 1e-12:
                record.skipped = (
                    f"rank cap reached before tolerance={tolerance}: rel error "
                    f"{rel_error:.3g} at ranks {rank_str(new.rank)}"
                )
                return None
            if after >= record.params_before:
                record.skipped = (
                    f"reaching tolerance={tolerance} needs ranks {rank_str(new.rank)} with "
                    f"{after:,} parameters, not fewer than the dense {record.params_before:,}"
                )
                return None
        new.train(linear.training)
        if not linear.weight.requires_grad:
            new.weight.requires_grad_(False)
        record.factorization = new.factorization
        record.in_tensorized_features = new.in_tensorized_features
        record.out_tensorized_features = new.out_tensorized_features
        record.rank = new.rank
        record.params_after = after
        record.rel_error = None if rel_error is None else float(rel_error)
        if "output_error" in info:
            record.output_error = float(info["output_error"])
            record.output_error_data_free = float(info["output_error_data_free"])
        return new


def untensorize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`FactorizedLinear` of ``model`` by a plain ``nn.Linear`` (a
    ``Conv1D`` for layers converted from one).

    Each layer becomes ``layer.to_linear()``: the rebuilt weight and the bias, so outputs are
    unchanged up to round-off. A :class:`SubFactorizedLinear` (one layer of a joint
    factorization) becomes its own ``nn.Linear``; a joint layer with ``n_layers > 1`` that is
    registered directly is left in place, since no single ``nn.Linear`` represents it. A module
    registered under several names is replaced by one new module under all of them.

    Parameters
    ----------
    model : torch.nn.Module
        The model (may itself be a ``FactorizedLinear``).
    inplace : bool, default False
        Modify ``model`` itself instead of a deep copy.

    Returns
    -------
    torch.nn.Module
        The model with plain linear layers.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module`` or ``inplace`` not a bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={describe(model)}: expected a torch.nn.Module")
    inplace = check_bool("inplace", inplace)
    root = model if inplace else copy.deepcopy(model)
    new_modules: dict[int, nn.Module] = {}
    targets: list[tuple[str, nn.Module]] = []
    replaced_prefixes: list[str] = []
    for name, module in root.named_modules(remove_duplicate=False):  # parents come first
        if any(name.startswith(prefix) for prefix in replaced_prefixes):
            continue
        joint = isinstance(module, FactorizedLinear) and module.n_layers > 1
        if not isinstance(module, (FactorizedLinear, SubFactorizedLinear)) or joint:
            continue
        if id(module) not in new_modules:
            linear = module.to_linear()
            linear.train(module.training)
            new_modules[id(module)] = linear
        targets.append((name, new_modules[id(module)]))
        replaced_prefixes.append(f"{name}." if name else "")
    for name, linear in targets:
        if name == "":
            return linear
        _set_submodule(root, name, linear)
    return root
