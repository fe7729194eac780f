"""Tucker weights: a small core tensor multiplied by one factor matrix along every mode.

``W = core x_1 factors[0] x_2 factors[1] ... x_N factors[N-1]``.

References
----------
Tucker, L. R. (1966). Some mathematical notes on three-mode factor analysis. Psychometrika 31.
De Lathauwer, L., De Moor, B. and Vandewalle, J. (2000). A multilinear singular value
decomposition. SIAM J. Matrix Anal. Appl. 21(4).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .._typing import RankSpec, Shape
from ..errors import RankError
from ..rank import count_tucker_params, resolve_tucker_ranks
from ._base import FactorizedWeight, Signature, check_einsum_letters, letters, parameter_list

__all__ = ["TuckerWeight"]


class TuckerWeight(FactorizedWeight):
    """Weight matrices stored as a Tucker tensor.

    Parameters: ``core`` of shape ``rank`` (one rank per mode of :attr:`tensor_shape`) and
    ``factors[k]`` of shape ``(n_k, r_k)``. ``rank`` is the tuple of ranks.
    """

    name = "tucker"
    #: What ``decomposition_kwargs`` may pass to :func:`factlin.decompositions.tucker`.
    decomposition_options: ClassVar[frozenset[str]] = frozenset(
        {"n_iter_max", "tol", "init", "random_state", "memory_limit_bytes", "callback", "verbose"}
    )

    def resolve_rank(self, rank: RankSpec) -> tuple[int, ...]:
        return resolve_tucker_ranks(rank, self.tensor_shape)

    @classmethod
    def count_params(cls, in_shape: Shape, out_shape: Shape, rank: Any, n_layers: int = 1) -> int:
        layers = (n_layers,) if n_layers > 1 else ()
        return count_tucker_params(layers + tuple(out_shape) + tuple(in_shape), rank)

    def _allocate(self, *, device: Any, dtype: Any) -> None:
        shape = self.tensor_shape
        check_einsum_letters(2 * len(shape) + 1, self.in_shape, self.out_shape)
        kwargs = {"device": device, "dtype": dtype}
        self.core = nn.Parameter(torch.empty(self.rank, **kwargs))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(n, r, **kwargs)) for n, r in zip(shape, self.rank)]
        )

    def _signature(self, layer_selected: bool) -> Signature:
        n_modes = len(self.tensor_shape)
        n_layer_modes = 1 if self.n_layers > 1 else 0
        n_out = len(self.out_shape)
        modes, ranks = letters(n_modes), letters(n_modes, n_modes)
        subscripts = [ranks] + [m + r for m, r in zip(modes, ranks)]
        if layer_selected:
            subscripts[1] = ranks[0]  # the layer factor's row: a vector over the layer rank
        layer = modes[:n_layer_modes]
        out = modes[n_layer_modes : n_layer_modes + n_out]
        return subscripts, layer, out, modes[n_layer_modes + n_out :]

    def _operands(self, layer: Optional[int]) -> list[torch.Tensor]:
        factors = parameter_list(self.factors)
        if layer is not None:
            factors[0] = factors[0][layer]
        return [self.core, *factors]

    def _operand_shapes(self, layer_selected: bool) -> list[Shape]:
        shapes = [tuple(self.rank), *zip(self.tensor_shape, self.rank)]
        if layer_selected:
            shapes[1] = shapes[1][1:]
        return shapes

    @property
    def decomposition(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(core, factors)``, as tensorly's Tucker tensors (the parameters themselves)."""
        return self.core, parameter_list(self.factors)

    def _check_mean_room(self, mean: float) -> None:
        if math.prod(self.rank) < 2:
            raise RankError(
                f"normal_(mean={mean!r}) on a Tucker weight of rank {self.rank}: a non-zero mean "
                "takes one core entry of its own besides the random ones; use a rank above 1 on "
                "some mode, or mean=0"
            )

    def _add_mean(self, mean: float, std: float) -> None:
        # Orthonormal factors whose first column is the all-ones direction (the others are
        # orthogonal to it, so they sum to zero): core[0, ..., 0] alone sets the mean, and
        # the rest of the core is the deviation, of the same norm.
        column_means = []
        for factor in self.factors:
            sample = torch.randn(factor.shape, dtype=torch.float64, device=factor.device)
            sample[:, 0] = 1.0
            q = torch.linalg.qr(sample).Q
            factor.copy_(q)
            column_means.append(float(q[:, 0].mean()))
        core = torch.randn(self.core.shape, dtype=torch.float64, device=self.core.device)
        first = (0,) * core.dim()
        core[first] = 0.0
        norm = float(core.norm())
        core *= std * math.sqrt(math.prod(self.tensor_shape)) / norm if norm > 0 else 0.0
        core[first] = mean / math.prod(column_means)
        self.core.copy_(core)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        shape = self.tensor_shape
        centered = _mode_to_center(shape, self.rank, self.n_layers)
        for k, factor in enumerate(self.factors):
            # Orthonormal columns (so ||W|| = ||core||); one factor's columns also sum to zero,
            # which makes the rebuilt weight exactly zero-mean.
            sample = torch.randn(factor.shape, dtype=torch.float64, device=factor.device)
            if k == centered:
                sample -= sample.mean(dim=0, keepdim=True)
            factor.copy_(torch.linalg.qr(sample).Q)
        self.core.normal_()
        norm = float(self.core.double().norm())
        target = std * math.sqrt(math.prod(shape))
        self.core.mul_(target / norm if norm > 0 else 0.0)
        if self.n_layers > 1:
            # layer l's weight is (core x_0 factors[0][l]) x_k factors[k]; the factors k >= 1
            # are orthonormal, so its norm is that of the contracted core: rescale row l.
            layer_cores = torch.tensordot(self.factors[0].double(), self.core.double(), dims=1)
            norms = layer_cores.reshape(self.n_layers, -1).norm(dim=1)
            per_layer = std * math.sqrt(self.out_features * self.in_features)
            scale = per_layer / norms.clamp_min(torch.finfo(torch.float64).tiny)
            self.factors[0].mul_(scale[:, None].to(self.factors[0].dtype))

    def init_from_tensor(self, tensor: torch.Tensor, **decomposition_kwargs: Any) -> dict:
        from ..decompositions import tucker

        result = tucker(tensor, self.rank, **decomposition_kwargs)
        with torch.no_grad():
            self.core.copy_(result.core)
            for factor, value in zip(self.factors, result.factors):
                factor.copy_(value)
        return {"rel_error": float(result.rel_error), "n_iter": int(result.n_iter)}


def _mode_to_center(shape: Shape, ranks: tuple[int, ...], n_layers: int) -> Optional[int]:
    """Largest non-layer mode whose rank leaves room for a zero-sum constraint (r_k < n_k)."""
    first = 1 if n_layers > 1 else 0
    candidates = [k for k in range(first, len(shape)) if ranks[k] < shape[k]]
    return max(candidates, key=lambda k: shape[k]) if candidates else None
