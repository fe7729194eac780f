"""The interface every factorized weight implements.

A factorized weight represents ``n_layers`` matrices of shape ``(out_features, in_features)``,
tensorized to ``(n_layers,) + out_shape + in_shape`` (the leading mode only when
``n_layers > 1``) and stored as a few small tensors (its *operands*). A subclass says which
operands it has and how their indices connect (an einsum signature); everything else -- the full
tensor, the matrix, the contraction with an input, the plan cache -- is shared here.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .._rebuilt_linear import rebuilt_linear
from .._typing import RankSpec, Shape
from ..contraction import (
    EINSUM_LETTERS,
    ContractionPlan,
    matmul_seconds,
    plan_contraction,
    run_steps,
)
from ..errors import FactlinError, ShapeError, describe

__all__ = ["FactorizedWeight", "Signature"]

#: Operand subscripts, then the letters of the layer mode (or ``''``), the out modes, the in modes.
Signature = tuple[list[str], str, str, str]

_BATCH_LETTER = EINSUM_LETTERS[-1]
_MAX_BATCH_BUCKET = 1 << 14
_COMPILED_BATCH_BUCKET = 256
#: Largest weight-only intermediate of the factorized forward, in dense weights' sizes.
_WEIGHT_INTERMEDIATE_FACTOR = 4
#: How much faster (modelled) a plan with larger weight-only intermediates must be to be used.
_RELAXED_PLAN_MARGIN = 1.5


def constant_under_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does, without importing
    ``torch._dynamo`` (1.5 s) at import time: dynamo runs ``fn`` outside the traced graph and
    bakes its result (Python constants only) into the graph."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@constant_under_compile
def _onnx_flag() -> bool:
    onnx = sys.modules.get("torch.onnx")  # never imported here: an export has imported it
    return onnx is not None and bool(onnx.is_in_onnx_export())


def exporting_to_onnx() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is tracing the current call.

    Then the factorized forward runs its ``'export'`` plan, which multiplies the input by the
    factors in turn: every intermediate holds the batch, so no subgraph of parameters alone is
    left for the exporter to constant-fold into a dense product stored in the file (CP at rank
    0.3: twice the factors' bytes or more). Cheap outside tracing (two flag reads)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()) and _onnx_flag()


def batch_bucket(batch: int) -> int:
    """Power of two at or above ``batch`` (capped), the batch size a plan is chosen for."""
    if torch.compiler.is_compiling():
        return _COMPILED_BATCH_BUCKET
    return min(_MAX_BATCH_BUCKET, 1 << max(0, int(batch) - 1).bit_length())


class FactorizedWeight(nn.Module, ABC):
    """A stack of ``n_layers`` weight matrices held in a low-rank tensor format.

    Parameters
    ----------
    in_shape, out_shape : tuple of int
        Tensorized input and output features.
    rank : str, float, int or tuple of int
        Rank specification, resolved by :mod:`factlin.rank`.
    n_layers : int
        Number of matrices parametrized jointly (a leading tensor mode when > 1).
    device, dtype
        Where and how the parameters are allocated.

    Notes
    -----
    Parameters are allocated but not initialized; call :meth:`reset_parameters` or
    :meth:`init_from_tensor`.
    """

    #: Registry name, e.g. ``'cp'``.
    name: ClassVar[str]

    def __init__(
        self,
        in_shape: Shape,
        out_shape: Shape,
        rank: RankSpec,
        n_layers: int = 1,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.in_shape: Shape = tuple(in_shape)
        self.out_shape: Shape = tuple(out_shape)
        self.n_layers: int = int(n_layers)
        self.in_features: int = math.prod(self.in_shape)
        self.out_features: int = math.prod(self.out_shape)
        self._plans: dict[tuple[Any, ...], ContractionPlan] = {}
        self.rank = self.resolve_rank(rank)
        self._allocate(device=device, dtype=dtype)

    # ---- what a factorization provides --------------------------------------------------
    @abstractmethod
    def resolve_rank(self, rank: RankSpec) -> Any:
        """Concrete rank(s) for this weight's shapes (see :mod:`factlin.rank`)."""

    @abstractmethod
    def _allocate(self, *, device: Any, dtype: Any) -> None:
        """Create the (uninitialized) parameters."""

    @abstractmethod
    def _signature(self, layer_selected: bool) -> Signature:
        """Einsum subscripts of :meth:`_operands`, and the layer/out/in mode letters."""

    @abstractmethod
    def _operands(self, layer: Optional[int]) -> list[torch.Tensor]:
        """The tensors to contract; with ``layer`` given, the layer mode is indexed away."""

    @abstractmethod
    def _operand_shapes(self, layer_selected: bool) -> list[Shape]:
        """The shapes of :meth:`_operands`, from the shapes and ranks alone: planning may run
        inside ``torch.jit.trace``, which records even a parameter's ``.shape`` read."""

    @abstractmethod
    def reset_parameters(self, std: float) -> None:
        """Random init: the rebuilt weight has mean 0 and standard deviation ``std``."""

    @abstractmethod
    def init_from_tensor(self, tensor: torch.Tensor, **decomposition_kwargs: Any) -> dict:
        """Set the parameters by decomposing ``tensor`` (shape :attr:`tensor_shape`).

        Returns the decomposition's diagnostics (e.g. ``rel_error``, ``n_iter``).
        """

    @classmethod
    @abstractmethod
    def count_params(cls, in_shape: Shape, out_shape: Shape, rank: Any, n_layers: int = 1) -> int:
        """Closed-form parameter count for already resolved ``rank``."""

    # ---- shared behaviour ---------------------------------------------------------------
    @property
    def tensor_shape(self) -> Shape:
        """Shape of the full tensor: ``(n_layers,) + out_shape + in_shape`` or without n_layers."""
        layers = (self.n_layers,) if self.n_layers > 1 else ()
        return layers + self.out_shape + self.in_shape

    def parameter_tensors(self) -> list[torch.Tensor]:
        """The parameters, like ``list(self.parameters())`` without its module traversal (this
        is on the forward's hot path: the inference cache stamps them on every call)."""
        if torch.compiler.is_compiling():
            return list(self.parameters())
        tensors = [p for p in self._parameters.values() if p is not None]
        for child in self._modules.values():
            tensors.extend(p for p in child._parameters.values() if p is not None)
        return tensors

    def num_parameters(self) -> int:
        """Number of scalars stored."""
        return sum(p.numel() for p in self.parameters())

    def _plan(
        self, kind: str, layer_selected: bool, batch: int, grad: bool = False
    ) -> ContractionPlan:
        """The cached plan for ``kind`` ('contract', 'export': see :func:`exporting_to_onnx`,
        or 'tensor'), chosen for a forward alone or
        (``grad``) a forward and a backward; built on first use only."""
        key = (kind, layer_selected, batch, grad)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build_plan(kind, layer_selected, batch, grad)
            self._plans[key] = plan
        return plan

    @constant_under_compile
    def _plan_steps(self, kind: str, layer_selected: bool, batch: int, grad: bool) -> tuple:
        return self._plan(kind, layer_selected, batch, grad).steps

    def _run_plan(
        self, kind: str, layer_selected: bool, batch: int, operands: list[torch.Tensor]
    ) -> torch.Tensor:
        """Execute the cached plan (the training one while autograd is on). Under
        ``torch.compile`` / ``torch.export`` the plan is found (or built) outside the traced
        graph, as planning is Python work dynamo cannot trace, and only its steps, plain
        constants, enter the graph."""
        # One plan for any `torch.jit.trace`: it checks its graph by tracing again without grad.
        tracing = torch.jit.is_tracing()
        grad = torch.is_grad_enabled() and not tracing
        compiling = torch.compiler.is_compiling()
        if kind == "contract" and (compiling or tracing) and _onnx_flag():
            kind, grad = "export", False  # see exporting_to_onnx
        if compiling:
            return run_steps(self._plan_steps(kind, layer_selected, batch, grad), operands)
        return self._plan(kind, layer_selected, batch, grad)(*operands)

    def _build_plan(
        self, kind: str, layer_selected: bool, batch: int, grad: bool = False
    ) -> ContractionPlan:
        subscripts, layer_letters, out_letters, in_letters = self._signature(layer_selected)
        shapes = self._operand_shapes(layer_selected)
        if kind in ("contract", "export"):
            in_sizes = self._contraction_in_shape()
            subscripts = [_BATCH_LETTER + in_letters, *subscripts]
            shapes = [(batch, *in_sizes), *shapes]
            output = _BATCH_LETTER + out_letters
        else:
            output = ("" if layer_selected else layer_letters) + out_letters + in_letters
        equation = ",".join(subscripts) + "->" + output
        if kind == "tensor":
            return plan_contraction(equation, shapes, with_backward=grad)
        if kind == "export":  # the input meets the factors one at a time (exporting_to_onnx)
            return plan_contraction(equation, shapes, batch_mode=_BATCH_LETTER,
                                    max_weight_intermediate=0)  # fmt: skip
        # Factors may be contracted together first where that is faster (at large batches even
        # the whole weight, as one einsum over x and the factors would), but no weight-only
        # intermediate may be much larger than the weight, or than the plan's largest
        # intermediate anyway: where the batch makes that larger (CP at a high rank: a
        # (rank, batch, mode) tensor), a Khatri-Rao product of the input factors no larger
        # than it may replace skinny batched steps by two large GEMMs (2.5x faster measured,
        # CP (32, 32) rank 8128 at batch 64). Only on a clear modelled win: the model misses
        # the strided reductions in the backward of such products (CP (24, 32) -> (48, 64)
        # rank 13960 at batch 64: modelled 7% faster, measured 40% slower).
        limit = _WEIGHT_INTERMEDIATE_FACTOR * self.in_features * self.out_features
        plan = plan_contraction(
            equation, shapes, batch_mode=_BATCH_LETTER, max_weight_intermediate=limit,
            with_backward=grad,
        )  # fmt: skip
        if plan.largest_intermediate > limit:
            relaxed = plan_contraction(
                equation, shapes, batch_mode=_BATCH_LETTER,
                max_weight_intermediate=plan.largest_intermediate, with_backward=grad,
            )  # fmt: skip
            if relaxed.seconds * _RELAXED_PLAN_MARGIN < plan.seconds:
                return relaxed
        return plan

    def _contraction_in_shape(self) -> Shape:
        """Shape the input's feature dimension is reshaped to (may pad with size-1 modes)."""
        return self.in_shape

    def _contraction_out_shape(self) -> Shape:
        return self.out_shape

    def contract_flops(self, batch: int) -> int:
        """FLOPs of :meth:`contract` for ``batch`` rows, from the cached plan for its bucket."""
        return (
            self._plan("contract", self.n_layers > 1, batch_bucket(batch)).flops
            * max(1, batch)
            // batch_bucket(batch)
        )

    def matrix_flops(self) -> int:
        """FLOPs of rebuilding one layer's matrix (:meth:`to_matrix` with a layer index)."""
        return self._plan("tensor", self.n_layers > 1, 0).flops

    def contract_seconds(self, batch: int, grad: bool = False) -> float:
        """Modelled time of :meth:`contract` for ``batch`` rows, with its backward when ``grad``
        (see :mod:`factlin.contraction`)."""
        return self._plan("contract", self.n_layers > 1, batch_bucket(batch), grad).seconds

    def matrix_seconds(self, grad: bool = False) -> float:
        """Modelled time of rebuilding one layer's matrix, with its backward when ``grad``."""
        return self._plan("tensor", self.n_layers > 1, 0, grad).seconds

    def contract(self, x: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """Apply the weight to ``x`` of shape ``(batch, in_features)`` without rebuilding it.

        Returns ``(batch, out_features)``. ``layer`` must be given when ``n_layers > 1``.
        """
        batch = x.shape[0]
        if batch == 0:  # plans leave the batch size free (-1), which 0 rows make ambiguous
            padded = torch.nn.functional.pad(x, (0, 0, 0, 1))
            return self.contract(padded, layer)[:0]
        selected = self.n_layers > 1
        operands = self._operands(layer if selected else None)
        # (batch, in_features) -> (batch, *in_modes) -> (batch, *out_modes) -> (batch, out_features)
        x = x.reshape(batch, *self._contraction_in_shape())
        y = self._run_plan("contract", selected, batch_bucket(batch), [x, *operands])
        return y.reshape(batch, self.out_features)

    def rebuilt_linear_pays(self, batch: int) -> bool:
        """Whether, for ``batch`` rows with gradients, the factorized backward of
        :meth:`rebuilt_linear` is modelled cheaper than autograd's backward of the rebuild (the
        dense weight gradient, then back through the rebuild)."""
        selected = self.n_layers > 1
        factorized = self._plan("contract", selected, batch_bucket(batch), True).seconds
        rebuild_backward = (
            self._plan("tensor", selected, 0, True).seconds
            - self._plan("tensor", selected, 0, False).seconds
            + matmul_seconds(1, self.out_features, self.in_features, max(1, batch))
        )
        return factorized < rebuild_backward

    def rebuilt_linear(
        self, x: torch.Tensor, layer: int, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``F.linear(x, self.to_matrix(layer), bias)`` for 2-D ``x``, the operands' gradients
        computed by the factorized contraction (see :mod:`factlin._rebuilt_linear`)."""
        selected = self.n_layers > 1
        operands = self._operands(layer if selected else None)
        rebuild = self._plan("tensor", selected, 0, False)
        contract = self._plan("contract", selected, batch_bucket(x.shape[0]), True)
        return rebuilt_linear(x, bias, rebuild, contract, self._contraction_in_shape(), operands)

    def to_tensor(self, layer: Optional[int] = None) -> torch.Tensor:
        """Rebuild the full tensor: ``tensor_shape``, or ``out_shape + in_shape`` for one layer.

        This materializes ``n_layers * out_features * in_features`` values: expensive for large
        layers, meant for inspection and for the ``'reconstructed'`` forward.
        """
        selected = layer is not None and self.n_layers > 1
        tensor = self._run_plan("tensor", selected, 0, self._operands(layer if selected else None))
        shape = self.out_shape + self.in_shape
        if self.n_layers > 1 and not selected:
            shape = (self.n_layers, *shape)
        return tensor.reshape(shape)

    def to_matrix(self, layer: Optional[int] = None) -> torch.Tensor:
        """Rebuild the weight matrix: ``(out, in)``, or ``(n_layers, out, in)`` when
        ``n_layers > 1`` and no ``layer`` is given. Expensive, like :meth:`to_tensor`."""
        tensor = self.to_tensor(layer)
        if self.n_layers > 1 and (layer is None):
            return tensor.reshape(self.n_layers, self.out_features, self.in_features)
        return tensor.reshape(self.out_features, self.in_features)

    # ---- tltorch's factorized-tensor API -------------------------------------------------
    # What code written for tltorch reads off ``layer.weight`` (a tltorch ``TensorizedTensor``
    # there): its matrix shape, its nested tensorized shape, ``normal_``, ``decomposition``,
    # calling and indexing it. Calling and indexing give dense tensors here (tltorch gives its
    # factorized tensors, which torch functions then rebuild).
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the matrix this weight stands for, as tltorch reports it:
        ``(out_features, in_features)``, or ``(n_layers, out_features, in_features)`` when
        ``n_layers > 1``. The tensorized tensor's shape is :attr:`tensor_shape`."""
        layers = (self.n_layers,) if self.n_layers > 1 else ()
        return (*layers, self.out_features, self.in_features)

    @property
    def tensorized_shape(self) -> tuple[Any, ...]:
        """tltorch's nested form of the shape: ``(out_shape, in_shape)``, or
        ``(n_layers, out_shape, in_shape)`` when ``n_layers > 1``."""
        layers = (self.n_layers,) if self.n_layers > 1 else ()
        return (*layers, self.out_shape, self.in_shape)

    @property
    def ndim(self) -> int:
        """``len(self.shape)``."""
        return len(self.shape)

    def dim(self) -> int:
        """``len(self.shape)``, like ``torch.Tensor.dim``."""
        return len(self.shape)

    def size(self, index: Optional[int] = None) -> Any:
        """:attr:`shape`, or its entry ``index``, like ``torch.Tensor.size``."""
        return self.shape if index is None else self.shape[index]

    def numel(self) -> int:
        """Number of entries of the full matrix (not of the parameters: see
        :meth:`num_parameters`)."""
        return math.prod(self.shape)

    @property
    @abstractmethod
    def decomposition(self) -> Any:
        """The parameters in tensorly's order: ``(weights, factors)`` for CP, ``(core, factors)``
        for Tucker, the list of cores for TT. The parameters themselves (not copies)."""

    def forward(self, indices: Optional[int] = None) -> torch.Tensor:
        """The full weight, as calling a tltorch weight gives: :meth:`to_matrix` (shape
        :attr:`shape`), or ``self[indices]``. Expensive, like :meth:`to_matrix`."""
        return self.to_matrix() if indices is None else self[indices]

    def __getitem__(self, indices: Any) -> torch.Tensor:
        """Entries of the matrix (shape :attr:`shape`). An int on a weight of ``n_layers > 1``
        rebuilds that layer's matrix alone; any other index is applied to :meth:`to_matrix`."""
        if self.n_layers > 1 and isinstance(indices, int) and not isinstance(indices, bool):
            if not -self.n_layers <= indices < self.n_layers:
                raise IndexError(
                    f"index {indices} is out of range for a weight of n_layers={self.n_layers}"
                )
            return self.to_matrix(indices % self.n_layers)
        return self.to_matrix()[indices]

    def normal_(self, mean: float = 0.0, std: float = 1.0) -> FactorizedWeight:
        """Re-draw the parameters so that the rebuilt tensor has mean ``mean`` and standard
        deviation ``std``, like tltorch's ``FactorizedTensor.normal_``; returns the weight.

        With ``mean == 0`` this is :meth:`reset_parameters`: the mean is exactly 0 and every
        layer's root mean square exactly ``std``. Otherwise a constant tensor ``mean`` is built
        into the format (CP: one rank-1 term; Tucker: the all-ones direction of every factor;
        TT: one channel of every bond) and the rest is drawn so that the deviation from
        ``mean`` has root mean square exactly ``std`` over the whole tensor. A no-op on the
        ``meta`` device.

        Raises
        ------
        TypeError
            If ``mean`` or ``std`` is not a real number.
        ValueError
            If either is not finite, ``std`` is negative, or (``mean != 0``) the ranks leave
            no room for the constant term (CP rank 1, a TT bond of 1).
        """
        mean = _check_real("mean", mean)
        std = _check_real("std", std)
        if std < 0:
            raise FactlinError(f"std={std!r}: expected a standard deviation >= 0")
        if mean != 0:
            self._check_mean_room(mean)
        if self.parameter_tensors()[0].is_meta:
            return self
        with torch.no_grad():
            self.reset_parameters(std)
            if mean != 0:
                self._add_mean(mean, std)
        return self

    def _check_mean_room(self, mean: float) -> None:
        """Raise if the ranks cannot hold a constant term besides a random one."""

    def _add_mean(self, mean: float, std: float) -> None:
        """Make the (zero-mean, ``std``) tensor ``mean + `` a zero-mean part of RMS ``std``."""
        raise NotImplementedError

    def _rescale_deviation(self, mean: float, std: float, scaled: torch.Tensor) -> None:
        """Scale ``scaled`` (a parameter, or a view of one, linear in the deviation from
        ``mean`` and absent from the constant term) so that the deviation has RMS ``std``."""
        tensor = self.to_tensor().double()
        deviation_sq = float((tensor - mean).pow(2).sum())
        target_sq = std**2 * tensor.numel()
        scale = math.sqrt(target_sq / deviation_sq) if deviation_sq > 0 else 0.0
        scaled.mul_(scale)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}, rank={self.rank}" + (
            f", n_layers={self.n_layers}" if self.n_layers > 1 else ""
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state


def parameter_list(parameters: nn.ParameterList) -> list[torch.Tensor]:
    """The members of ``parameters`` as a list, without ``ParameterList``'s slow indexing (the
    forward's hot path); the public iteration under ``torch.compile``, which traces it."""
    if torch.compiler.is_compiling():
        return list(parameters)
    return list(parameters._parameters.values())


def check_einsum_letters(needed: int, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
    """Raise when a tensorization has more modes than einsum has index letters."""
    if needed > len(EINSUM_LETTERS) - 1:
        raise ShapeError(
            f"in_tensorized_features={tuple(in_shape)} and out_tensorized_features="
            f"{tuple(out_shape)} need {needed} einsum indices; at most "
            f"{len(EINSUM_LETTERS) - 1} are available: use fewer tensorized modes"
        )


def letters(count: int, start: int = 0) -> str:
    """``count`` distinct einsum letters starting at position ``start``."""
    return EINSUM_LETTERS[start : start + count]


def _check_real(name: str, value: object) -> float:
    """``value`` as a finite float, or a TypeError / FactlinError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={describe(value)}: expected a real number")
    value = float(value)
    if not math.isfinite(value):
        raise FactlinError(f"{name}={value!r}: expected a finite number")
    return value
