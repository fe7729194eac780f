"""``FactorizedLinear``: a drop-in ``nn.Linear`` whose weight is a low-rank tensor."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._typing import RankSpec, Shape
from ._validation import (
    check_bool,
    check_dtype,
    check_implementation,
    check_input,
    check_int,
    check_layer_index,
    check_tensorized_features,
)
from .factorizations import FactorizedWeight, get_factorization
from .rank import validate_rank

__all__ = ["FactorizedLinear", "SubFactorizedLinear"]


class FactorizedLinear(nn.Module):
    """Linear layer whose weight matrix is tensorized and stored in low-rank form.

    The weight of shape ``(out_features, in_features)`` is viewed as a tensor of shape
    ``out_tensorized_features + in_tensorized_features`` (with a leading ``n_layers`` mode when
    several layers share one factorization) and parametrized in CP, Tucker or TT-matrix form.

    Parameters
    ----------
    in_tensorized_features : tuple of int
        Shape the input features are split into; ``prod(in_tensorized_features)`` is
        ``in_features``.
    out_tensorized_features : tuple of int
        Shape the output features are split into.
    bias : bool, default True
        Whether to learn an additive bias (shape ``(out,)``, or ``(n_layers, out)``).
    factorization : {'cp', 'tucker', 'tt'}, default 'cp'
        Case-insensitive; ``'blocktt'`` and ``'ttm'`` are aliases of ``'tt'``.
    rank : 'same', float, int or tuple of int, default 'same'
        ``'same'``: as many parameters as the dense weight; float ``f``: ``f`` times that; int:
        the CP rank / every Tucker rank / every TT bond rank; tuple: per-mode Tucker ranks or TT
        bond ranks. See :mod:`factlin.rank`. The resolved ranks are in :attr:`rank`.
    implementation : {'factorized', 'reconstructed'}, default 'factorized'
        ``'factorized'`` contracts the input with the factors directly (the full weight is never
        formed); ``'reconstructed'`` rebuilds the weight matrix and calls ``F.linear``. Can be
        changed after construction.
    n_layers : int, default 1
        Number of linear layers parametrized jointly by one factorized tensor.
    checkpointing : bool, default False
        Recompute the forward during backward (``torch.utils.checkpoint``) in training mode to
        save activation memory.
    device, dtype
        As for ``nn.Linear``; ``dtype`` must be a floating-point type.

    Attributes
    ----------
    in_features, out_features : int
    weight : FactorizedWeight
        The parametrization: ``weight.to_matrix()`` rebuilds the dense matrix.
    bias : torch.nn.Parameter or None

    Examples
    --------
    >>> layer = FactorizedLinear((8, 8, 12), (8, 16, 24), factorization='tucker', rank=0.1)
    >>> layer(torch.randn(32, 768)).shape
    torch.Size([32, 3072])
    """

    def __init__(
        self,
        in_tensorized_features: Shape,
        out_tensorized_features: Shape,
        bias: bool = True,
        factorization: str = "cp",
        rank: RankSpec = "same",
        implementation: str = "factorized",
        n_layers: int = 1,
        checkpointing: bool = False,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        in_shape = check_tensorized_features("in_tensorized_features", in_tensorized_features)
        out_shape = check_tensorized_features("out_tensorized_features", out_tensorized_features)
        weight_class = get_factorization(factorization)
        validate_rank(rank)
        self._implementation = check_implementation(implementation)
        self.n_layers = check_int("n_layers", n_layers, 1)
        self.checkpointing = check_bool("checkpointing", checkpointing)
        check_bool("bias", bias)
        check_dtype(dtype)

        self.in_tensorized_features: Shape = in_shape
        self.out_tensorized_features: Shape = out_shape
        self.in_features: int = math.prod(in_shape)
        self.out_features: int = math.prod(out_shape)
        self.factorization: str = weight_class.name
        self.weight: FactorizedWeight = weight_class(
            in_shape, out_shape, rank, self.n_layers, device=device, dtype=dtype
        )
        if bias:
            bias_shape = (
                (self.out_features,) if self.n_layers == 1 else (self.n_layers, self.out_features)
            )
            self.bias = nn.Parameter(torch.empty(bias_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ---- configuration ---------------------------------------------------------------------
    @property
    def rank(self) -> Any:
        """The ranks actually used (CP: int; Tucker: one per mode; TT: bonds with boundary 1s)."""
        return self.weight.rank

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        self._implementation = check_implementation(value)

    def reset_parameters(self) -> None:
        """Re-initialize like ``nn.Linear``: the rebuilt weight has mean 0 and standard deviation
        ``1 / sqrt(3 * in_features)``; the bias is uniform in ``±1 / sqrt(in_features)``."""
        self.weight.reset_parameters(1.0 / math.sqrt(3 * self.in_features))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, indices: int = 0) -> torch.Tensor:
        """Apply layer ``indices`` to ``x`` of shape ``(*, in_features)``.

        Returns a tensor of shape ``(*, out_features)``.

        Raises
        ------
        TypeError, ValueError
            If ``x`` is not a tensor of the layer's dtype and device with last dimension
            ``in_features``, or ``indices`` is not an int in ``[0, n_layers)``.
        """
        layer = check_layer_index("indices", indices, self.n_layers)
        check_input(x, self.in_features, self.weight_reference)
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, layer, use_reentrant=False)
        return self._forward(x, layer)

    @property
    def weight_reference(self) -> torch.Tensor:
        """One of the weight's parameters (for dtype and device)."""
        return next(iter(self.weight.parameters()))

    def _forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        bias = self.bias
        if bias is not None and self.n_layers > 1:
            bias = bias[layer]
        if self._implementation == "reconstructed":
            return F.linear(x, self.weight.to_matrix(layer), bias)
        # (*, in) -> (batch, in) -> (batch, out) -> (*, out)
        y = self.weight.contract(x.reshape(-1, self.in_features), layer)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    # ---- layers of a joint factorization ------------------------------------------------------
    def get_linear(self, indices: int = 0) -> SubFactorizedLinear:
        """Layer ``indices`` as a module sharing this layer's parameters."""
        return SubFactorizedLinear(self, check_layer_index("indices", indices, self.n_layers))

    def __getitem__(self, indices: int) -> SubFactorizedLinear:
        return self.get_linear(indices)

    def __len__(self) -> int:
        return self.n_layers

    def to_linear(self, indices: int = 0) -> nn.Linear:
        """A plain ``nn.Linear`` with the rebuilt weight (and bias) of layer ``indices``."""
        layer = check_layer_index("indices", indices, self.n_layers)
        reference = self.weight_reference
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=reference.device,
            dtype=reference.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight.to_matrix(layer))
            if self.bias is not None:
                linear.bias.copy_(self.bias if self.n_layers == 1 else self.bias[layer])
        return linear

    def extra_repr(self) -> str:
        parts = [
            f"in_tensorized_features={self.in_tensorized_features}",
            f"out_tensorized_features={self.out_tensorized_features}",
            f"bias={self.bias is not None}",
            f"factorization={self.factorization!r}",
            f"rank={self.rank!r}",
            f"implementation={self._implementation!r}",
        ]
        if self.n_layers != 1:
            parts.append(f"n_layers={self.n_layers}")
        if self.checkpointing:
            parts.append("checkpointing=True")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class SubFactorizedLinear(nn.Module):
    """One layer of a jointly factorized :class:`FactorizedLinear`; shares its parameters."""

    def __init__(self, main: FactorizedLinear, index: int) -> None:
        super().__init__()
        self.main = main
        self.index = index
        self.in_features = main.in_features
        self.out_features = main.out_features

    @property
    def bias(self) -> Optional[torch.Tensor]:
        if self.main.bias is None:
            return None
        return self.main.bias if self.main.n_layers == 1 else self.main.bias[self.index]

    def to_matrix(self) -> torch.Tensor:
        """The rebuilt ``(out_features, in_features)`` weight of this layer."""
        return self.main.weight.to_matrix(self.index)

    def to_linear(self) -> nn.Linear:
        return self.main.to_linear(self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x, self.index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index}, main={self.main!r})"
