"""What code written for TensorLy-Torch (tltorch) meets when it imports factlin instead.

* :func:`convert_tltorch_state_dict`: a state_dict saved from tltorch ``FactorizedLinear``
  layers, with factlin's key names. tltorch keeps a weight's factors in its own ``FactorList``
  (``weight.factors.factor_0``, ...) where factlin has ``nn.ParameterList``s
  (``weight.factors.0`` for CP and Tucker, ``weight.cores.0`` for TT); the tensors themselves
  are laid out alike (CP: ``weights`` and one ``(mode, rank)`` factor per mode of
  ``(n_layers,) + out + in``; Tucker: ``core`` and the factors; BlockTT with one layer:
  ``(r_k, out_k, in_k, r_{k+1})`` cores). ``FactorizedLinear.load_state_dict`` applies the same
  mapping to its own keys, so a tltorch checkpoint loads directly.
* :data:`TLTORCH_ONLY_NAMES` and :func:`tltorch_only_name_error`: the rest of tltorch's
  namespace, which factlin does not provide, named in a clear ``AttributeError``
  (``factlin.FactorizedEmbedding``, ...).

No tltorch import anywhere: only key names and tensor shapes are read.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from typing import Any, Optional

import torch

from ._state_dict_check import StateDictMismatchError

__all__ = [
    "convert_tltorch_state_dict",
    "tltorch_layout",
    "map_tltorch_keys",
    "TLTORCH_ONLY_NAMES",
    "tltorch_only_name_error",
]

#: A tltorch ``FactorList`` entry: ``<prefix>weight.factors.factor_<k>``.
_FACTOR_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)weight\.factors\.factor_(?P<index>\d+)$")

#: Public names of tltorch (0.4/0.5) that factlin does not provide.
TLTORCH_ONLY_NAMES: frozenset[str] = frozenset(
    {
        "FactorizedConv",
        "FactorizedEmbedding",
        "FactorizedSparseLinear",
        "TRL",
        "TCL",
        "FactorizedTensor",
        "CPTensor",
        "TuckerTensor",
        "TTTensor",
        "TensorizedTensor",
        "CPTensorized",
        "TuckerTensorized",
        "BlockTT",
        "tensor_init",
        "tensor_lasso",
        "remove_tensor_lasso",
        "tensor_dropout",
        "remove_tensor_dropout",
        "factorized_tensors",
        "factorized_layers",
        "functional",
        "tensor_hooks",
        "init",
        "utils",
    }
)

_README = "the section 'Coming from tltorch' of factlin's README"


def tltorch_only_name_error(name: str) -> AttributeError:
    """The ``AttributeError`` for ``factlin.<name>`` where ``name`` is tltorch's, not factlin's."""
    return AttributeError(
        f"module 'factlin' has no attribute {name!r}: tltorch.{name} has no factlin counterpart. "
        "factlin provides FactorizedLinear and its tools (from_linear, from_linear_list, "
        "tensorize_model, the decompositions), not the rest of tltorch; see "
        f"{_README} for what ports unchanged"
    )


def tltorch_layout(state_dict: Mapping[str, Any], prefix: str = "") -> Optional[str]:
    """The factorization of a tltorch ``FactorizedLinear`` weight held under ``prefix`` in
    ``state_dict``: ``'cp'``, ``'tucker'``, ``'tt'`` (BlockTT), or None when its keys are not
    tltorch's. A BlockTT weight of several layers (5-way cores, which factlin's TT layout
    cannot hold) is ``'tt-layers'``."""
    factors = _factor_keys(state_dict, prefix)
    if not factors:
        return None
    if f"{prefix}weight.weights" in state_dict:
        return "cp"
    if f"{prefix}weight.core" in state_dict:
        return "tucker"
    ndims = {_ndim(state_dict[key]) for key in factors.values()}
    if ndims == {4}:
        return "tt"
    if ndims == {5}:
        return "tt-layers"
    return None


def map_tltorch_keys(state_dict: MutableMapping[str, Any], prefix: str = "") -> Optional[str]:
    """Rename, in place, the tltorch keys of the weight under ``prefix`` to factlin's; returns
    the layout found (see :func:`tltorch_layout`), None (and nothing renamed) if none.

    Raises
    ------
    StateDictMismatchError
        (a ``ShapeError``) For a tltorch BlockTT weight of several layers, whose cores
        factlin cannot hold.
    """
    layout = tltorch_layout(state_dict, prefix)
    for old, new in _renames(state_dict, prefix).items():
        state_dict[new] = state_dict.pop(old)
    return layout


def convert_tltorch_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict:
    """A copy of ``state_dict`` (of a whole model, or of one layer) with the keys of every
    tltorch ``FactorizedLinear`` weight renamed to factlin's, ready for ``load_state_dict``.

    Other entries keep their names and order (the tensors are not copied), and torch's
    ``_metadata`` is kept. ``load_state_dict`` of a model holding factlin layers maps their keys
    already (each ``FactorizedLinear`` renames its own); this function gives the converted dict
    itself, e.g. to save it.

    Parameters
    ----------
    state_dict : mapping of str to torch.Tensor
        As returned by ``model.state_dict()`` of a model with tltorch layers (or loaded by
        ``torch.load``).

    Returns
    -------
    collections.OrderedDict

    Raises
    ------
    TypeError
        If ``state_dict`` is not a mapping with string keys.
    StateDictMismatchError
        (a ``ShapeError``) For a tltorch BlockTT weight of several layers (see
        :func:`map_tltorch_keys`).

    Examples
    --------
    >>> sd = {"fc.weight.weights": torch.ones(2), "fc.weight.factors.factor_0": torch.ones(3, 2)}
    >>> list(convert_tltorch_state_dict(sd))
    ['fc.weight.weights', 'fc.weight.factors.0']
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise TypeError(
            f"state_dict of type {type(state_dict).__name__}: expected a mapping of parameter "
            "names (str) to tensors, as model.state_dict() returns"
        )
    names: dict[str, str] = {}
    prefixes = {m.group("prefix") for key in state_dict if (m := _FACTOR_KEY.match(key))}
    for prefix in sorted(prefixes):
        names.update(_renames(state_dict, prefix))
    converted: OrderedDict = OrderedDict(
        (names.get(key, key), value) for key, value in state_dict.items()
    )
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        converted._metadata = metadata  # type: ignore[attr-defined]
    return converted


def _renames(state_dict: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """``{tltorch key: factlin key}`` for the weight under ``prefix`` (empty if not tltorch's).

    Raises
    ------
    StateDictMismatchError
        (a ``ShapeError``) For a tltorch BlockTT weight of several layers, whose cores
        factlin cannot hold.
    """
    layout = tltorch_layout(state_dict, prefix)
    if layout is None:
        return {}
    if layout == "tt-layers":
        raise StateDictMismatchError(
            f"state_dict{_where(prefix)} holds a tltorch BlockTT weight of several layers "
            "(5-way cores, one layer mode in each); factlin's TT layout selects the layer with "
            "a leading core instead, so these tensors cannot be loaded: rebuild the layers with "
            "factlin (FactorizedLinear.from_linear_list on each tltorch layer's dense matrix)"
        )
    target = "cores" if layout == "tt" else "factors"
    factors = sorted(_factor_keys(state_dict, prefix).items())
    return {key: f"{prefix}weight.{target}.{position}" for position, (_, key) in enumerate(factors)}


def _factor_keys(state_dict: Mapping[str, Any], prefix: str) -> dict[int, str]:
    """``{k: key}`` of the tltorch factor entries directly under ``prefix``."""
    found = {}
    for key in state_dict:
        match = _FACTOR_KEY.match(key)
        if match is not None and match.group("prefix") == prefix:
            found[int(match.group("index"))] = key
    return found


def _ndim(value: object) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else -1


def _where(prefix: str) -> str:
    return f" (at {prefix[:-1]!r})" if prefix else ""
