"""CP (canonical polyadic) weights: a weights vector and one factor matrix per mode.

``W[i_1, ..., i_N] = sum_r weights[r] * prod_k factors[k][i_k, r]``.

References
----------
Kolda, T. G. and Bader, B. W. (2009). Tensor decompositions and applications. SIAM Review 51(3).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .._typing import RankSpec, Shape
from ..errors import RankError
from ..rank import count_cp_params, resolve_cp_rank
from ._base import FactorizedWeight, Signature, check_einsum_letters, letters, parameter_list

__all__ = ["CPWeight"]

#: Above this rank the init scale is set from its expectation instead of the exact norm.
_EXACT_NORM_MAX_RANK = 2048


class CPWeight(FactorizedWeight):
    """Weight matrices stored as a rank-``R`` CP tensor.

    Parameters: ``weights`` of shape ``(R,)`` and ``factors[k]`` of shape ``(n_k, R)`` for every
    mode ``n_k`` of :attr:`tensor_shape`. ``rank`` is the int ``R``.
    """

    name = "cp"
    #: What ``decomposition_kwargs`` may pass to :func:`factlin.decompositions.cp_als`.
    decomposition_options: ClassVar[frozenset[str]] = frozenset(
        {
            "n_iter_max",
            "tol",
            "init",
            "random_state",
            "line_search",
            "block_size",
            "max_seconds",
            "time_limit_seconds",
            "memory_limit_bytes",
            "callback",
            "verbose",
        }
    )

    def resolve_rank(self, rank: RankSpec) -> int:
        return resolve_cp_rank(rank, self.tensor_shape)

    @classmethod
    def count_params(cls, in_shape: Shape, out_shape: Shape, rank: Any, n_layers: int = 1) -> int:
        layers = (n_layers,) if n_layers > 1 else ()
        return count_cp_params(layers + tuple(out_shape) + tuple(in_shape), rank)

    def _allocate(self, *, device: Any, dtype: Any) -> None:
        shape = self.tensor_shape
        check_einsum_letters(len(shape) + 2, self.in_shape, self.out_shape)
        kwargs = {"device": device, "dtype": dtype}
        self.weights = nn.Parameter(torch.empty(self.rank, **kwargs))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(n, self.rank, **kwargs)) for n in shape]
        )

    def _signature(self, layer_selected: bool) -> Signature:
        n_layer_modes = 1 if self.n_layers > 1 else 0
        n_out, n_in = len(self.out_shape), len(self.in_shape)
        modes = letters(n_layer_modes + n_out + n_in)
        rank_letter = letters(1, len(modes))
        layer, out, inp = (
            modes[:n_layer_modes],
            modes[n_layer_modes : n_layer_modes + n_out],
            modes[n_layer_modes + n_out :],
        )
        subscripts = [rank_letter] + [m + rank_letter for m in modes]
        if layer_selected:
            subscripts[1] = rank_letter  # the layer factor's row: a vector over the rank
        return subscripts, layer, out, inp

    def _operands(self, layer: Optional[int]) -> list[torch.Tensor]:
        factors = parameter_list(self.factors)
        if layer is not None:
            factors[0] = factors[0][layer]
        return [self.weights, *factors]

    def _operand_shapes(self, layer_selected: bool) -> list[Shape]:
        shapes = [(self.rank,), *((n, self.rank) for n in self.tensor_shape)]
        if layer_selected:
            shapes[1] = shapes[1][1:]
        return shapes

    @property
    def decomposition(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(weights, factors)``, as tensorly's CP tensors (the parameters themselves)."""
        return self.weights, parameter_list(self.factors)

    def _check_mean_room(self, mean: float) -> None:
        if self.rank < 2:
            raise RankError(
                f"normal_(mean={mean!r}) on a CP weight of rank 1: a non-zero mean takes a "
                "rank-1 term of its own besides the random ones; use a rank >= 2 or mean=0"
            )

    def _add_mean(self, mean: float, std: float) -> None:
        # The last rank-1 term becomes the constant; the others sum to zero each (one factor
        # is centred), so the deviation is theirs alone: rescale their weights.
        for factor in self.factors:
            factor[:, -1] = 1.0
        self.weights[-1] = mean
        self._rescale_deviation(mean, std, self.weights[:-1])

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        shape = self.tensor_shape
        for factor in self.factors:
            factor.normal_()
        centered = _mode_to_center(shape, self.n_layers)
        if centered is not None:  # zero column sums: every rank-1 term sums to 0, so does W
            self.factors[centered].sub_(self.factors[centered].mean(dim=0, keepdim=True))
        self.weights.fill_(1.0)
        norm_sq = _cp_norm_sq(list(self.factors), shape)
        target_sq = std**2 * math.prod(shape)
        scale = (target_sq / norm_sq) ** (0.5 / len(shape)) if norm_sq > 0 else 0.0
        for factor in self.factors:
            factor.mul_(scale)
        if self.n_layers > 1 and self.rank <= _EXACT_NORM_MAX_RANK:
            # layer l's weight has norm^2 = u_l^T H u_l with u_l = factors[0][l] and H the
            # Hadamard product of the other factors' Grams: rescale row l to the target.
            gram = torch.ones(self.rank, self.rank, dtype=torch.float64, device=self.weights.device)
            for factor in list(self.factors)[1:]:
                f = factor.double()
                gram.mul_(f.T @ f)
            rows = self.factors[0].double()
            norms = ((rows @ gram) * rows).sum(dim=1).clamp_min(0).sqrt()
            per_layer = std * math.sqrt(self.out_features * self.in_features)
            scale = per_layer / norms.clamp_min(torch.finfo(torch.float64).tiny)
            self.factors[0].mul_(scale[:, None].to(self.factors[0].dtype))

    def init_from_tensor(self, tensor: torch.Tensor, **decomposition_kwargs: Any) -> dict:
        from ..decompositions import cp_als

        result = cp_als(tensor, self.rank, **decomposition_kwargs)
        with torch.no_grad():
            self.weights.copy_(result.weights)
            for factor, value in zip(self.factors, result.factors):
                factor.copy_(value)
        return {
            "rel_error": float(result.rel_error),
            "n_iter": int(result.n_iter),
            "stop_reason": result.stop_reason,
            # True when max_seconds cut the sweeps short: the best fit reached in time
            "time_limited": result.stop_reason == "max_seconds",
            "seconds": float(result.seconds),
        }


def _mode_to_center(shape: Shape, n_layers: int) -> Optional[int]:
    """The largest non-layer mode of size >= 2, whose factor gets zero-mean columns."""
    first = 1 if n_layers > 1 else 0
    candidates = [k for k in range(first, len(shape)) if shape[k] >= 2]
    return max(candidates, key=lambda k: shape[k]) if candidates else None


def _cp_norm_sq(factors: list[torch.Tensor], shape: Shape) -> float:
    """``||W||_F^2`` of a CP tensor with unit weights (exact via Grams, or its expectation)."""
    rank = factors[0].shape[1]
    if rank > _EXACT_NORM_MAX_RANK:
        return float(sum(f.double().pow(2).sum() for f in factors[:1])) * math.prod(
            float(f.double().pow(2).sum()) / rank for f in factors[1:]
        )
    gram = torch.ones(rank, rank, dtype=torch.float64, device=factors[0].device)
    for factor in factors:
        f = factor.double()
        gram.mul_(f.T @ f)
    return float(gram.sum())
