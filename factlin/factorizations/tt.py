"""TT-matrix (tensor-train matrix, "BlockTT"/"TTM") weights: a chain of 4-way cores.

Core ``k`` has shape ``(r_{k-1}, out_k, in_k, r_k)`` with ``r_0 = r_d = 1``, and
``W[(o_1..o_d), (i_1..i_d)] = G_1[:, o_1, i_1, :] @ ... @ G_d[:, o_d, i_d, :]``.
When the two sides have different numbers of modes, the shorter one is padded with size-1
modes. With ``n_layers > 1`` a leading core ``(1, n_layers, 1, r_1)`` selects the layer.

References
----------
Oseledets, I. V. (2011). Tensor-train decomposition. SIAM J. Sci. Comput. 33(5).
Novikov, A., Podoprikhin, D., Osokin, A. and Vetrov, D. (2015). Tensorizing neural networks.
NeurIPS.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .._typing import RankSpec, Shape
from ..errors import RankError
from ..rank import count_tt_params, resolve_tt_ranks
from ._base import FactorizedWeight, Signature, check_einsum_letters, letters, parameter_list

__all__ = ["TTWeight"]


def _pad(shape: Shape, length: int) -> Shape:
    return tuple(shape) + (1,) * (length - len(shape))


def core_modes(in_shape: Shape, out_shape: Shape, n_layers: int) -> tuple[Shape, Shape]:
    """The (out, in) sizes of every core, layer core and padding included."""
    d = max(len(in_shape), len(out_shape))
    outs, ins = _pad(out_shape, d), _pad(in_shape, d)
    if n_layers > 1:
        outs, ins = (n_layers, *outs), (1, *ins)
    return outs, ins


class TTWeight(FactorizedWeight):
    """Weight matrices stored as a TT-matrix. ``rank`` is the bond ranks, boundary 1s included."""

    name = "tt"
    #: What ``decomposition_kwargs`` may pass to :func:`factlin.decompositions.tt_matrix_svd`.
    decomposition_options: ClassVar[frozenset[str]] = frozenset({"rel_tol", "memory_limit_bytes"})

    @property
    def _core_modes(self) -> tuple[Shape, Shape]:
        return core_modes(self.in_shape, self.out_shape, self.n_layers)

    def resolve_rank(self, rank: RankSpec) -> tuple[int, ...]:
        outs, ins = self._core_modes
        return resolve_tt_ranks(rank, [o * i for o, i in zip(outs, ins)])

    @classmethod
    def count_params(cls, in_shape: Shape, out_shape: Shape, rank: Any, n_layers: int = 1) -> int:
        outs, ins = core_modes(tuple(in_shape), tuple(out_shape), n_layers)
        return count_tt_params([o * i for o, i in zip(outs, ins)], rank)

    def _allocate(self, *, device: Any, dtype: Any) -> None:
        outs, ins = self._core_modes
        check_einsum_letters(3 * len(outs) + 2, self.in_shape, self.out_shape)
        kwargs = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            [
                nn.Parameter(torch.empty(self.rank[k], o, i, self.rank[k + 1], **kwargs))
                for k, (o, i) in enumerate(zip(outs, ins))
            ]
        )

    def _contraction_in_shape(self) -> Shape:
        return self._core_modes[1][1:] if self.n_layers > 1 else self._core_modes[1]

    def _signature(self, layer_selected: bool) -> Signature:
        outs, _ = self._core_modes
        n = len(outs)
        out_l, in_l, bond_l = letters(n), letters(n, n), letters(n + 1, 2 * n)
        subscripts = [bond_l[k] + out_l[k] + in_l[k] + bond_l[k + 1] for k in range(n)]
        subscripts[0] = subscripts[0][1:]  # boundary ranks are squeezed away (see _operands)
        subscripts[-1] = subscripts[-1][:-1]
        layer = ""
        if self.n_layers > 1:
            layer = out_l[0]
            # the layer core's in-mode has size 1 and is squeezed away
            subscripts[0] = subscripts[0][0] + subscripts[0][2:]
            out_l, in_l = out_l[1:], in_l[1:]
            if layer_selected:
                subscripts[0] = bond_l[1]
        return subscripts, layer, out_l, in_l

    def _operands(self, layer: Optional[int]) -> list[torch.Tensor]:
        cores = parameter_list(self.cores)
        last = len(cores) - 1
        # (select/squeeze rather than indexing: this runs on every forward, and Python-level
        # tensor indexing costs several microseconds a call)
        if self.n_layers > 1:
            first = cores[0][0, layer, 0] if layer is not None else cores[0][0, :, 0]
        else:
            first = cores[0].squeeze(0)
        operands = [first, *cores[1:]]
        operands[last] = operands[last].squeeze(-1)
        return operands

    def _operand_shapes(self, layer_selected: bool) -> list[Shape]:
        outs, ins = self._core_modes
        ranks = self.rank
        shapes = [(ranks[k], o, i, ranks[k + 1]) for k, (o, i) in enumerate(zip(outs, ins))]
        if self.n_layers > 1:  # (1, n_layers, 1, r_1) -> (r_1,) or (n_layers, r_1)
            shapes[0] = shapes[0][3:] if layer_selected else (shapes[0][1], shapes[0][3])
        else:
            shapes[0] = shapes[0][1:]
        shapes[-1] = shapes[-1][:-1]
        return shapes

    @property
    def decomposition(self) -> list[torch.Tensor]:
        """The cores ``(r_{k-1}, out_k, in_k, r_k)``, as tensorly's TT-matrices (the parameters
        themselves; with ``n_layers > 1`` the first is the layer core ``(1, n_layers, 1, r_1)``)."""
        return parameter_list(self.cores)

    def _check_mean_room(self, mean: float) -> None:
        if any(r < 2 for r in self.rank[1:-1]):
            raise RankError(
                f"normal_(mean={mean!r}) on a TT weight with bonds {self.rank}: a non-zero mean "
                "takes one channel of every bond besides the random ones; use bonds >= 2 or "
                "mean=0"
            )

    def _add_mean(self, mean: float, std: float) -> None:
        # Channel 0 of every bond carries the constant alone (block-diagonal cores); the other
        # channels keep the zero-mean draw (its last core is centred), rescaled through the
        # first core.
        cores = parameter_list(self.cores)
        last = len(cores) - 1
        if last == 0:
            cores[0].add_(mean)
            return
        for k, core in enumerate(cores):
            if k > 0:
                core[0].zero_()
            if k < last:
                core[..., 0].zero_()
            core[0, :, :, 0] = mean if k == 0 else 1.0
        self._rescale_deviation(mean, std, cores[0][..., 1:])

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        # Centre the last core over its (out, in) slice (so the weight sums to zero), then
        # right-orthogonalize every core but the first: each layer's norm is then the norm of
        # its row of the first core, which is scaled to the target.
        cores = [torch.randn(c.shape, dtype=torch.float64, device=c.device) for c in self.cores]
        last = cores[-1]
        if last.shape[1] * last.shape[2] > 1:
            last -= last.mean(dim=(1, 2), keepdim=True)
        for k in range(len(cores) - 1, 0, -1):
            r0, o, i, r1 = cores[k].shape
            # (r0, o*i*r1)^T = Q R  ->  core_k = Q^T (orthonormal rows), R^T pushed left
            q, r = torch.linalg.qr(cores[k].reshape(r0, o * i * r1).T)
            cores[k] = q.T.reshape(r0, o, i, r1)
            cores[k - 1] = torch.einsum("abcd,ed->abce", cores[k - 1], r)
        first = cores[0]  # (1, layers or out_1, 1 or in_1, r_1)
        target = std * math.sqrt(self.out_features * self.in_features)
        if self.n_layers > 1:
            norms = first.pow(2).sum(dim=(0, 2, 3), keepdim=True).sqrt()
        else:
            norms = first.norm()
        first *= target / norms.clamp_min(torch.finfo(torch.float64).tiny)
        for core, value in zip(self.cores, cores):
            core.copy_(value)

    def init_from_tensor(self, tensor: torch.Tensor, **decomposition_kwargs: Any) -> dict:
        from ..decompositions import tt_matrix_svd

        outs, ins = self._core_modes
        full = tensor.reshape(*outs, *ins)
        result = tt_matrix_svd(full, outs, ins, self.rank, **decomposition_kwargs)
        ranks = tuple(int(r) for r in result.ranks)
        if ranks != self.rank:
            # an error tolerance (rel_tol) chose smaller bonds than the allocated ones
            reference = self.cores[0]
            self.rank = ranks
            self._plans.clear()
            self._allocate(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for core, value in zip(self.cores, result.cores):
                core.copy_(value.reshape(core.shape))
        return {"rel_error": float(result.rel_error), "ranks": ranks}
