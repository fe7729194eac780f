"""Calibrated (data-aware) decompositions: fit a factorized weight to a layer's *outputs*.

A data-free decomposition minimizes the weight error ``||W - W_hat||_F``. What a trained model
needs kept is each layer's output on real inputs ``x``:

``f(W_hat) = E ||W x - W_hat x||^2 = tr((W - W_hat) C (W - W_hat)^T)``,  ``C = E[x x^T]``.

With a bias, the bias absorbs the mean error: ``b_hat = b + (W - W_hat) mu`` is optimal for
any ``W_hat``, and what remains is the same form with ``C`` the covariance of ``x``. In
sequential conversion the compressed layer sees other inputs ``x'`` (its upstream layers are
already compressed) and must still produce ``W x``; then

``f(W_hat) = s - 2 <W_hat, P> + tr(W_hat C' W_hat^T)``,  ``P = W E[x x'^T]``,  ``s = tr(W C W^T)``,

a quadratic of the same kind. :class:`OutputObjective` holds ``(P, C, s)`` for one or several
layers; every fit here minimizes it for a :class:`~factlin.factorizations.FactorizedWeight` of
any format and any number of tensorized modes:

1. **Starts.** (a) the data-free decomposition of the target ``T`` (``T = W``, or the least
   squares target ``P C^-1`` in sequential conversion); (b) a *whitened* one: ``C`` is
   approximated by a Kronecker product ``C_1 ⊗ ... ⊗ C_d`` over the input modes (each
   ``C_k`` the partial trace of ``C`` over the other modes), ``T`` is multiplied along each
   input mode by ``L_k^T`` (``C_k = L_k L_k^T``, damped Cholesky), decomposed data-free, and the
   inverse maps ``L_k^-T`` are folded back into the input-side factors or cores, which keeps the
   format. The start with the lower objective is kept. With one mode per side (a plain low-rank
   matrix, CP or Tucker) the Kronecker approximation is ``C`` itself and (b) is the exact
   optimum, the whitened truncated SVD (SVD-LLM); no refinement follows.
2. **Refinement.** Every factor and core at once, by L-BFGS with a strong-Wolfe line search on
   ``f / s`` in float64. Only improvements are kept, so the result is never worse than the
   start (monotone); it stops after ``n_iter_max`` iterations or when an iteration improves the
   relative objective by less than ``tol``. Each factor alone is a linear least-squares problem
   (weighted ALS would solve them in turn); one quasi-Newton method serves all formats alike.

References
----------
.. [1] X. Wang, Y. Zheng, Z. Wan and M. Zhang, "SVD-LLM: Truncation-aware Singular Value
   Decomposition for Large Language Model Compression", ICLR 2025 (Cholesky whitening).
.. [2] Z. Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for Compressing
   Large Language Models", 2023.
.. [3] J. Martens and R. Grosse, "Optimizing Neural Networks with Kronecker-factored
   Approximate Curvature", ICML 2015 (Kronecker-factored second moments).
.. [4] D. C. Liu and J. Nocedal, "On the limited memory BFGS method for large scale
   optimization", Math. Programming 45, 1989.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import opt_einsum
import torch

from ..input_stats import DEFAULT_DAMPING, InputStats, PairedInputStats, damped

__all__ = [
    "OutputObjective",
    "calibrated_fit",
    "kronecker_factors",
    "whitening",
    "whitened_error",
    "DEFAULT_REFINE_ITER",
    "DEFAULT_REFINE_TOL",
]

#: Default L-BFGS iterations of the refinement.
DEFAULT_REFINE_ITER = 100
#: Default relative-improvement tolerance of the refinement: stop once the last
#: :data:`_STOP_WINDOW` iterations together lowered the objective by less than this fraction
#: (single L-BFGS iterations often gain little before larger gains follow).
DEFAULT_REFINE_TOL = 1e-3
_STOP_WINDOW = 10


def whitening(moment: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower-triangular ``L`` with ``L L^T = damped(moment)`` (float64).

    The damping is raised tenfold (up to four times) if the Cholesky factorization still fails
    in floating point; a last resort takes the symmetric square root from ``eigh``.
    """
    matrix = moment.to(torch.float64)
    for attempt in range(5):
        factor, info = torch.linalg.cholesky_ex(damped(matrix, damping * 10**attempt))
        if int(info.max() if info.ndim else info) == 0 and torch.isfinite(factor).all():
            return factor
    values, vectors = torch.linalg.eigh(damped(matrix, max(damping, 1e-2)))
    return vectors * values.clamp_min(0).sqrt()[..., None, :]


def kronecker_factors(moment: torch.Tensor, in_shape: Sequence[int]) -> list[torch.Tensor]:
    """Per-mode factors ``C_k`` with ``C ≈ C_1 ⊗ ... ⊗ C_d`` (up to scale) for inputs
    tensorized to ``in_shape``: ``C_k`` is the partial trace of ``C`` over every other mode.

    ``moment`` is ``(n, n)`` with ``n = prod(in_shape)``; exact when ``C`` is a Kronecker
    product (or when ``d = 1``).
    """
    d = len(in_shape)
    tensor = moment.reshape(*in_shape, *in_shape)
    letters = "abcdefghijklmnopqrstuvwxyz"[: d + 1]
    factors = []
    for k in range(d):
        rows = letters[:d]
        cols = rows[:k] + letters[d] + rows[k + 1 :]  # every other mode pair is traced out
        equation = f"{rows}{cols}->{rows[k]}{letters[d]}"
        factors.append(torch.einsum(equation, tensor))
    return factors


@dataclass
class OutputObjective:
    """``f(W_hat) = s - 2 <W_hat, P> + tr(W_hat C W_hat^T)`` per layer, summed over layers.

    Attributes
    ----------
    cross : Tensor
        ``P``, ``(n_layers, out, in)``, float64.
    moment : Tensor
        ``C``, ``(n_layers, in, in)``, float64 (symmetric positive semi-definite).
    scale : Tensor
        ``s``, ``(n_layers,)``, float64: ``f`` of the zero matrix (the output energy).
    target : Tensor
        ``(n_layers, out, in)``: the matrix to decompose for the starts (``W``, or the least
        squares target of a sequential fit), in the weight's dtype.
    """

    cross: torch.Tensor
    moment: torch.Tensor
    scale: torch.Tensor
    target: torch.Tensor
    linear: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        # f = c0 + <E C, E> + 2 <W_hat, R> with E = W_hat - T, R = T C - P, c0 = s - <T C, T>:
        # no cancellation when W_hat is close to T (R and c0 vanish when T = W)
        t = self.target.to(torch.float64)
        tc = t @ self.moment
        if self.linear is None:
            self.linear = tc - self.cross
        if self.offset is None:
            self.offset = self.scale - (tc * t).sum(dim=(-2, -1))

    @classmethod
    def for_weights(
        cls,
        weights: torch.Tensor,
        stats: Sequence[InputStats | PairedInputStats],
        centered: bool,
        damping: float = DEFAULT_DAMPING,
    ) -> OutputObjective:
        """The objective of ``weights`` (``(n_layers, out, in)``) under the input statistics of
        each layer (an :class:`InputStats`, or a :class:`PairedInputStats` for sequential
        conversion)."""
        crosses, moments, scales, targets = [], [], [], []
        for weight, s in zip(weights, stats):
            w = weight.detach().to(torch.float64)
            if isinstance(s, PairedInputStats):
                dense_moment = s.dense.moment(centered).to(w.device)
                moment = s.compressed.moment(centered).to(w.device)
                cross = w @ s.cross_moment(centered).to(w.device)  # (out, in)
                scale = ((w @ dense_moment) * w).sum()
                # the least-squares target P C'^-1, regularized towards W: T = W + (P - W C')
                # (C' + damping)^-1 (exactly W when x' = x; W where C' leaves T undetermined)
                residual = cross - w @ moment
                target = w + torch.linalg.solve(damped(moment, damping), residual.mT).mT
            else:
                moment = s.moment(centered).to(w.device)
                cross = w @ moment
                scale = (cross * w).sum()
                target = w
            crosses.append(cross)
            moments.append(moment)
            scales.append(scale)
            targets.append(target.to(weight.dtype))
        return cls(
            torch.stack(crosses), torch.stack(moments), torch.stack(scales), torch.stack(targets)
        )

    def value(self, matrices: torch.Tensor) -> torch.Tensor:
        """``sum_l f_l(W_hat_l)`` for ``matrices`` ``(n_layers, out, in)`` (differentiable)."""
        m = matrices.to(torch.float64)
        residual = m - self.target.to(torch.float64)
        quad = ((residual @ self.moment) * residual).sum()
        return self.offset.sum() + quad + 2 * (m * self.linear).sum()

    def relative_error(self, matrices: torch.Tensor) -> float:
        """``sqrt(f / s)``: the relative output error (0.0 when the outputs are all zero)."""
        total = float(self.scale.sum())
        if total <= 0:
            return 0.0
        return math.sqrt(max(float(self.value(matrices)), 0.0) / total)


# --------------------------------------------------------------------------------------------
# Input-side maps on any factorized weight
# --------------------------------------------------------------------------------------------
def _in_mode_slots(weight: Any) -> list[tuple[int, int]]:
    """For each input mode of ``weight`` (its contraction in-shape): the operand index and
    dimension that carry it. Every format has exactly one such place per input mode."""
    subscripts, _, _, in_letters = weight._signature(False)
    slots = []
    for letter in in_letters:
        places = [(k, s.index(letter)) for k, s in enumerate(subscripts) if letter in s]
        if len(places) != 1:  # pragma: no cover - guards a future format
            raise NotImplementedError(
                f"{type(weight).__name__}: input mode {letter!r} is carried by {len(places)} "
                "operands; calibrated starts need exactly one"
            )
        slots.append(places[0])
    return slots


@torch.no_grad()
def map_in_modes(weight: Any, maps: Sequence[torch.Tensor]) -> None:
    """Multiply ``weight`` along each input mode ``k`` by ``maps[k]`` (``(n_k, n_k)``), in
    place: the rebuilt matrix ``W_hat`` becomes ``W_hat M^T`` with ``M = maps[0] ⊗ ... ⊗
    maps[-1]``. The format and the ranks are unchanged."""
    operands = weight._operands(None)
    for (index, dim), matrix in zip(_in_mode_slots(weight), maps):
        if matrix.shape[0] == 1:
            operands[index].mul_(matrix.reshape(()).to(operands[index].dtype))
            continue
        view = operands[index]  # a view of the parameter: updated in place
        moved = view.movedim(dim, -1).to(torch.float64) @ matrix.mT.to(torch.float64)
        view.copy_(moved.movedim(-1, dim).to(view.dtype))


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------
def _state(weight: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in weight.state_dict().items()}


def _rebuild_expression(weight: Any) -> Callable[..., torch.Tensor]:
    """An opt_einsum expression rebuilding the full tensor from ``weight._operands(None)``;
    its contraction path is found once (factlin's own planner costs more than this contraction
    for the many one-off weights a rank or shape search fits)."""
    subscripts, layer, out, inp = weight._signature(False)
    shapes = [tuple(op.shape) for op in weight._operands(None)]
    return opt_einsum.contract_expression(",".join(subscripts) + "->" + layer + out + inp, *shapes)


def _matrices(
    weight: Any, expression: Optional[Callable[..., torch.Tensor]] = None
) -> torch.Tensor:
    """The rebuilt ``(n_layers, out, in)`` matrices."""
    expression = expression or _rebuild_expression(weight)
    tensor = expression(*weight._operands(None), backend="torch")
    return tensor.reshape(weight.n_layers, weight.out_features, weight.in_features)


def _is_exact_start(weight: Any) -> bool:
    """One mode per side and one layer, CP or Tucker: the whitened start is the optimum."""
    return (
        weight.name in ("cp", "tucker")
        and weight.n_layers == 1
        and len(weight.in_shape) == 1
        and len(weight.out_shape) == 1
    )


class _Whitening:
    """Kronecker-factored whitening of the input side: ``L_K = L_1 ⊗ ... ⊗ L_d`` with
    ``L_k L_k^T`` the damped ``k``-th Kronecker factor of the (layer-averaged) moment."""

    def __init__(self, weight: Any, objective: OutputObjective, damping: float) -> None:
        self.in_shape = tuple(int(n) for n in weight._contraction_in_shape())
        factors = kronecker_factors(objective.moment.mean(0), self.in_shape)
        self.lowers = [whitening(f, damping) for f in factors]  # C_k ≈ L_k L_k^T
        eye = [
            torch.eye(len(lower), dtype=lower.dtype, device=lower.device) for lower in self.lowers
        ]
        self.inverses = [
            torch.linalg.solve_triangular(lower, e, upper=False)
            for lower, e in zip(self.lowers, eye)
        ]  # L_k^-1

    def to_whitened(self, weight: Any) -> None:
        """``W_hat -> W_hat L_K`` on the factors (input side only)."""
        map_in_modes(weight, [lower.mT for lower in self.lowers])

    def from_whitened(self, weight: Any) -> None:
        """``W_hat -> W_hat L_K^-1`` on the factors."""
        map_in_modes(weight, [inverse.mT for inverse in self.inverses])

    def apply(self, matrices: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``M L_K`` (or ``M L_K^-T`` with ``inverse``) for ``M`` ``(..., rows, in)``."""
        maps = self.inverses if inverse else self.lowers
        lead = matrices.shape[:-1]
        out = matrices.reshape(*lead, *self.in_shape)
        base = len(lead)
        for k, matrix in enumerate(maps):
            m = matrix.mT if inverse else matrix
            # along input mode k: out[..., j, ...] @ m  (M L_K: right-multiply by L_k)
            out = (out.movedim(base + k, -1) @ m.to(out.dtype)).movedim(-1, base + k)
        return out.reshape(matrices.shape)


def _whitened_start(
    weight: Any, objective: OutputObjective, white: _Whitening, kwargs: dict
) -> dict:
    """Decompose ``T L_K`` data-free; ``weight`` is left in *whitened* coordinates."""
    target = objective.target.to(torch.float64)
    tensor = white.apply(target).to(objective.target.dtype).reshape(weight.tensor_shape)
    return weight.init_from_tensor(tensor, **kwargs)


@torch.no_grad()
def whitened_error(
    weight: Any,
    objective: OutputObjective,
    damping: float = DEFAULT_DAMPING,
    kwargs: Optional[dict] = None,
) -> float:
    """Fit ``weight`` by the whitened start alone (no data-free start, no refinement) and
    return its relative output error: a quick estimate for choosing ranks and formats."""
    white = _Whitening(weight, objective, damping)
    _whitened_start(weight, objective, white, dict(kwargs or {}))
    white.from_whitened(weight)
    return objective.relative_error(_matrices(weight))


class _WhitenedQuadratic(torch.autograd.Function):
    """``<(M - T) C, M - T> + 2 <M, R>`` with its gradient ``2 (M - T) C + 2 R`` from one
    matrix product (``C`` symmetric)."""

    @staticmethod
    def forward(ctx: Any, m: torch.Tensor, target: torch.Tensor, moment: torch.Tensor,
                linear: Optional[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        residual = m - target
        product = residual @ moment  # (layers, out, in)
        value = (product * residual).sum()
        if linear is not None:
            value = value + 2 * (m * linear).sum()
            product = product + linear
        ctx.save_for_backward(product)
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (product,) = ctx.saved_tensors
        return 2 * grad * product, None, None, None


def _refine(
    weight: Any,
    objective: OutputObjective,
    white: _Whitening,
    n_iter_max: int,
    tol: float,
) -> tuple[int, float]:
    """L-BFGS on the objective in whitened coordinates (``weight`` is in them on entry and on
    exit); ``weight`` ends at the best point seen. Returns (iterations, seconds)."""
    tic = time.perf_counter()
    dtype = torch.float64 if objective.target.dtype == torch.float64 else torch.float32
    # f = c0 + <E C, E> + 2 <W_hat, R>, E = W_hat - T, R = T C - P, c0 = s - <T C, T>;
    # whitened: W_hat = W_w L_K^-1 gives E_w = W_w - T L_K, C_w = L_K^-1 C L_K^-T, R_w = R L_K^-T
    target = objective.target.to(torch.float64)
    target_c = target @ objective.moment
    linear = target_c - objective.cross
    exact_target = bool(linear.abs().max() <= 1e-12 * max(1.0, float(objective.cross.abs().max())))
    moment_w = white.apply(white.apply(objective.moment, inverse=True).mT, inverse=True)
    moment_w = ((moment_w + moment_w.mT) / 2).to(dtype)
    target_w = white.apply(target).to(dtype)
    linear_w = None if exact_target else white.apply(linear, inverse=True).to(dtype)
    scale = float(objective.scale.sum())
    work = copy.deepcopy(weight).to(dtype)
    params = list(work.parameters())
    expression = _rebuild_expression(work)

    def value_and_grad(flat: torch.Tensor) -> tuple[float, torch.Tensor]:
        _unflatten(flat, params)
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            matrices = _matrices(work, expression)
            value = _WhitenedQuadratic.apply(matrices, target_w, moment_w, linear_w) / scale
            grads = torch.autograd.grad(value, params)
        return float(value), torch.cat([g.reshape(-1) for g in grads])

    start = torch.cat([p.detach().reshape(-1) for p in params])
    best, n_iter = _lbfgs(value_and_grad, start, n_iter_max, tol)
    _unflatten(best, list(weight.parameters()))
    return n_iter, time.perf_counter() - tic


def _unflatten(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].reshape(p.shape).to(p.dtype))
            offset += n


def _lbfgs(
    value_and_grad: Any, x: torch.Tensor, n_iter_max: int, tol: float, history: int = 20
) -> tuple[torch.Tensor, int]:
    """Minimize by L-BFGS with a backtracking (Armijo) line search: every accepted step lowers
    the value, so the returned point is the best one visited. Stops after ``n_iter_max``
    iterations, when the last ``_STOP_WINDOW`` iterations lowered the value by less than
    ``tol`` times the value, or when no step along the search direction decreases it.

    (Written here rather than taken from ``torch.optim.LBFGS``: importing ``torch.optim`` pulls
    in ``torch._dynamo``, seconds of import time for a conversion.)
    """
    value, grad = value_and_grad(x)
    seen = [value]
    steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s)
    n_iter = 0
    while n_iter < n_iter_max:
        n_iter += 1
        # two-loop recursion: direction = -H grad
        q = grad.clone()
        alphas = []
        for s, y, rho in reversed(steps):
            alpha = rho * float(s @ q)
            q -= alpha * y
            alphas.append(alpha)
        if steps:
            s, y, rho = steps[-1]
            q *= 1.0 / (rho * float(y @ y))  # gamma = s.y / y.y
        for (s, y, rho), alpha in zip(steps, reversed(alphas)):
            beta = rho * float(y @ q)
            q += (alpha - beta) * s
        direction = -q
        slope = float(grad @ direction)
        if not slope < 0:  # not a descent direction: restart from the gradient
            steps.clear()
            direction = -grad
            slope = -float(grad @ grad)
            if slope == 0:
                break
        step = 1.0 if steps else min(1.0, 1.0 / max(float(grad.abs().sum()), 1e-30))
        accepted = False
        for _ in range(30):
            candidate = x + step * direction
            new_value, new_grad = value_and_grad(candidate)
            if math.isfinite(new_value) and new_value <= value + 1e-4 * step * slope:
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
        s, y = candidate - x, new_grad - grad
        sy = float(s @ y)
        if sy > 1e-12 * float(y @ y):
            steps.append((s, y, 1.0 / sy))
            if len(steps) > history:
                steps.pop(0)
        x, value, grad = candidate, new_value, new_grad
        seen.append(value)
        if len(seen) > _STOP_WINDOW and seen[-1 - _STOP_WINDOW] - value <= tol * abs(value):
            break
    return x, n_iter


def calibrated_fit(
    weight: Any,
    objective: OutputObjective,
    *,
    decomposition_kwargs: Optional[dict] = None,
    damping: float = DEFAULT_DAMPING,
    refine: bool = True,
    n_iter_max: int = DEFAULT_REFINE_ITER,
    tol: float = DEFAULT_REFINE_TOL,
) -> dict:
    """Set the parameters of ``weight`` to minimize ``objective`` (see the module docstring).

    Parameters
    ----------
    weight : FactorizedWeight
        Allocated with its final shapes and ranks; overwritten.
    objective : OutputObjective
        One entry per layer of ``weight``.
    decomposition_kwargs : dict, optional
        Passed to the data-free decompositions of the starts.
    damping : float
        Relative damping of the Kronecker factors' Cholesky factorizations.
    refine : bool
        Run the L-BFGS refinement after the starts.
    n_iter_max, tol
        Refinement iterations and relative-improvement tolerance.

    Returns
    -------
    dict
        ``output_error`` (final), ``output_error_data_free``, ``output_error_whitened``,
        ``output_error_start`` (the better start, before refinement), ``start``
        (``'data-free'`` or ``'whitened'``), ``refine_iter``, ``refine_seconds``, and the
        diagnostics of the kept start's decomposition (e.g. ``n_iter``).
    """
    kwargs = dict(decomposition_kwargs or {})
    target = objective.target.reshape(weight.tensor_shape)
    info_free = weight.init_from_tensor(target, **kwargs)
    error_free = objective.relative_error(_matrices(weight).detach())
    state_free = _state(weight)
    white = _Whitening(weight, objective, damping)
    info_white = _whitened_start(weight, objective, white, kwargs)
    state_white = _state(weight)  # whitened coordinates
    white.from_whitened(weight)
    error_white = objective.relative_error(_matrices(weight).detach())
    if not math.isfinite(error_white) or error_white > error_free:
        weight.load_state_dict(state_free)
        start, error_start, info = "data-free", error_free, info_free
    else:
        start, error_start, info = "whitened", error_white, info_white
    state_start = _state(weight)
    out = {k: v for k, v in info.items() if k != "rel_error"}
    n_iter, seconds = 0, 0.0
    error = error_start
    if refine and n_iter_max > 0 and not _is_exact_start(weight) and error_start > 0:
        if start == "whitened":
            weight.load_state_dict(state_white)
        else:
            white.to_whitened(weight)
        n_iter, seconds = _refine(weight, objective, white, n_iter_max, tol)
        white.from_whitened(weight)
        error = objective.relative_error(_matrices(weight).detach())
        if not error <= error_start:  # never worse than the start (round-off, NaN)
            weight.load_state_dict(state_start)
            error = error_start
    out.update(
        output_error=error,
        output_error_data_free=error_free,
        output_error_whitened=error_white,
        output_error_start=error_start,
        start=start,
        refine_iter=n_iter,
        refine_seconds=seconds,
    )
    return out
