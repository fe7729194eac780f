"""Modules that are a linear layer under another name: ``nn.Linear`` and Hugging Face's ``Conv1D``.

``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...) computes ``x @ weight + bias`` with its
weight stored transposed, ``(in_features, out_features)``. Here a *kind* names the dense type
(``'linear'`` or ``'conv1d'``); :func:`dense_weight` gives every kind's weight as an
``(out_features, in_features)`` view, and :func:`build_dense` builds a module of a kind back from
such a matrix. ``transformers`` is never imported here unless a model already did: a ``Conv1D``
can only exist once ``transformers.pytorch_utils`` is in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

__all__ = ["LINEAR", "CONV1D", "conv1d_class", "kind_of", "is_linear_like", "dense_weight",
           "build_dense", "remember_kind", "kind_of_layer"]  # fmt: skip

#: The kinds.
LINEAR = "linear"
CONV1D = "conv1d"
#: Where Hugging Face defines ``Conv1D``.
_CONV1D_MODULE = "transformers.pytorch_utils"
#: Attribute of a ``FactorizedLinear`` holding the kind it was built from (absent: ``'linear'``).
_KIND_ATTRIBUTE = "_dense_kind"


def conv1d_class() -> Optional[type]:
    """``transformers.pytorch_utils.Conv1D`` if ``transformers`` is loaded, else None."""
    module = sys.modules.get(_CONV1D_MODULE)
    return getattr(module, "Conv1D", None) if module is not None else None


def kind_of(module: object) -> Optional[str]:
    """``'linear'`` for an ``nn.Linear``, ``'conv1d'`` for a ``Conv1D`` (exact types only:
    a subclass may use its weight in other ways), None for anything else."""
    if type(module) is nn.Linear:
        return LINEAR
    conv1d = conv1d_class()
    if conv1d is not None and type(module) is conv1d:
        return CONV1D
    return None


def is_linear_like(module: object) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a ``Conv1D``, subclasses included."""
    if isinstance(module, nn.Linear):
        return True
    conv1d = conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as ``(out_features, in_features)`` (a view for a
    ``Conv1D``, whose weight is stored transposed; the parameter itself otherwise)."""
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.T
    return module.weight


def build_dense(kind: str, matrix: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A module of ``kind`` computing ``F.linear(x, matrix, bias)``, on ``matrix``'s device and
    dtype, holding copies of ``matrix`` (shape ``(out, in)``) and ``bias``."""
    out_features, in_features = matrix.shape
    if kind == CONV1D:
        conv1d = conv1d_class()
        if conv1d is None:  # a pickled layer loaded without transformers imported
            from transformers.pytorch_utils import Conv1D as conv1d
        with torch.device("meta"):  # no allocation, no random init
            module = conv1d(out_features, in_features)
        weight = matrix.detach().T.contiguous()
        module.weight = nn.Parameter(weight)
        if bias is None:  # Conv1D always has a bias: zeros leave the outputs unchanged
            module.bias = nn.Parameter(matrix.new_zeros(out_features))
        else:
            module.bias = nn.Parameter(bias.detach().clone())
        return module
    linear = nn.Linear(
        in_features,
        out_features,
        bias=bias is not None,
        device=matrix.device,
        dtype=matrix.dtype,
    )
    with torch.no_grad():
        linear.weight.copy_(matrix)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def remember_kind(layer: nn.Module, source: object) -> None:
    """Record on ``layer`` the kind of the module it replaces (for ``to_linear``)."""
    kind = CONV1D if is_linear_like(source) and not isinstance(source, nn.Linear) else LINEAR
    if kind == LINEAR:
        layer.__dict__.pop(_KIND_ATTRIBUTE, None)
    else:
        setattr(layer, _KIND_ATTRIBUTE, kind)


def kind_of_layer(layer: nn.Module) -> str:
    """The kind ``layer.to_linear()`` builds (``'linear'`` unless :func:`remember_kind` said)."""
    return getattr(layer, _KIND_ATTRIBUTE, LINEAR)
