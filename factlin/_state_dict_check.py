"""Clear errors when a ``state_dict`` comes from a differently configured layer.

Without this check, loading the state of a ``'tucker'`` layer into a ``'tt'`` layer, or of a
rank-8 layer into a rank-4 one, fails with torch's generic list of missing keys and tensor
sizes, which says nothing about the settings the user chose. Here:

* :func:`record_config` stores the layer's configuration (factorization, resolved rank,
  tensorized shapes, ``n_layers``) in the ``state_dict``'s ``_metadata``, next to torch's own
  ``version`` entry; it survives ``torch.save`` / ``torch.load(weights_only=True)``, pickling
  and ``copy.deepcopy`` of the ``state_dict``.
* :func:`check_state_dict` runs before the layer loads anything. When the incoming state holds
  tensors for this layer, it compares the recorded configuration with the layer's (or, for a
  ``state_dict`` without metadata, infers the saved configuration from the tensors' names and
  shapes) and raises :class:`StateDictMismatchError` naming both configurations.

A ``state_dict`` with no tensor for the layer is left to ``strict`` (missing keys), and a
partial one whose tensors all fit is accepted, so ``strict=False`` keeps its usual meaning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from .errors import ShapeError

__all__ = ["StateDictMismatchError", "layer_config", "record_config", "check_state_dict"]

#: Key of the layer's entry in its ``state_dict`` metadata.
METADATA_KEY = "factlin"

#: The settings that decide every parameter's shape (bias aside, which ``strict`` covers).
_CONFIG_FIELDS = (
    "factorization",
    "rank",
    "in_tensorized_features",
    "out_tensorized_features",
    "n_layers",
)


class StateDictMismatchError(ShapeError):
    """A ``state_dict`` saved from a layer whose configuration differs from this layer's."""


def layer_config(layer: nn.Module) -> dict[str, Any]:
    """The configuration of a ``FactorizedLinear`` as plain Python values."""
    return {
        "factorization": layer.factorization,
        "rank": layer.rank,
        "in_tensorized_features": tuple(layer.in_tensorized_features),
        "out_tensorized_features": tuple(layer.out_tensorized_features),
        "n_layers": int(layer.n_layers),
    }


def record_config(layer: nn.Module, destination: Mapping[str, Any], prefix: str) -> None:
    """Store :func:`layer_config` in ``destination._metadata`` (when it has metadata)."""
    metadata = getattr(destination, "_metadata", None)
    if metadata is None:
        return
    metadata.setdefault(prefix[:-1], {})[METADATA_KEY] = layer_config(layer)


def check_state_dict(
    layer: nn.Module, state_dict: Mapping[str, Any], prefix: str, local_metadata: Mapping
) -> None:
    """Raise :class:`StateDictMismatchError` if ``state_dict`` was saved from another config.

    Only the entries under ``prefix`` are looked at; nothing is raised when there are none.
    """
    incoming = {
        key[len(prefix) :]: value
        for key, value in state_dict.items()
        if key.startswith(prefix) and _is_layer_key(key[len(prefix) :])
    }
    if not incoming:
        return
    mine = layer_config(layer)
    saved = local_metadata.get(METADATA_KEY) if isinstance(local_metadata, Mapping) else None
    if isinstance(saved, Mapping):
        differing = [f for f in _CONFIG_FIELDS if _normalize(saved.get(f)) != _normalize(mine[f])]
        if differing:
            raise StateDictMismatchError(
                f"state_dict{_where(prefix)} was saved from {_describe(saved)}, but this layer "
                f"is {_describe(mine)}: they differ in {', '.join(differing)}. Build the layer "
                "with the saved configuration before loading"
            )
        return
    # No metadata (e.g. a plain dict): compare the tensors' names and shapes.
    expected = {
        name: tuple(tensor.shape)
        for name, tensor in (*layer.named_parameters(), *layer.named_buffers())
    }
    problems = []
    for name, value in incoming.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if name.startswith("weight.") and name not in expected:
            problems.append(f"unexpected tensor {name!r}")
        elif name in expected and shape is not None and shape != expected[name]:
            problems.append(f"{name!r} has shape {shape}, expected {expected[name]}")
    if problems:
        raise StateDictMismatchError(
            f"state_dict{_where(prefix)} holds {_infer(incoming)}, but this layer is "
            f"{_describe(mine)} ({'; '.join(problems[:3])}"
            f"{'; ...' if len(problems) > 3 else ''}). Build the layer with the configuration "
            "the state_dict was saved from before loading"
        )


def _is_layer_key(name: str) -> bool:
    return name == "bias" or name.startswith("weight.")


def _normalize(value: object) -> object:
    """Tuples and lists compare equal (metadata may come back with either)."""
    if isinstance(value, (tuple, list)):
        return tuple(_normalize(v) for v in value)
    return value


def _where(prefix: str) -> str:
    return f" (at {prefix[:-1]!r})" if prefix else ""


def _describe(config: Mapping[str, Any]) -> str:
    text = (
        f"a {config.get('factorization')!r} layer with rank {config.get('rank')!r}, "
        f"in_tensorized_features={_normalize(config.get('in_tensorized_features'))} and "
        f"out_tensorized_features={_normalize(config.get('out_tensorized_features'))}"
    )
    n_layers = config.get("n_layers", 1)
    return text + (f" and n_layers={n_layers}" if n_layers != 1 else "")


def _shape(value: object) -> Optional[tuple[int, ...]]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _indexed(incoming: Mapping[str, Any], name: str) -> list[tuple[int, ...]]:
    """Shapes of ``weight.<name>.<k>`` for k = 0, 1, ... (a ParameterList)."""
    pattern = re.compile(rf"weight\.{name}\.(\d+)$")
    found = {int(m.group(1)): _shape(v) for k, v in incoming.items() if (m := pattern.match(k))}
    return [found[k] for k in sorted(found) if found[k] is not None]


def _infer(incoming: Mapping[str, Any]) -> str:
    """What the tensors of a ``state_dict`` say about the layer they were saved from."""
    bias = _shape(incoming.get("bias"))
    layers = f", n_layers={bias[0]}" if bias is not None and len(bias) == 2 else ""
    cores = _indexed(incoming, "cores")
    factors = _indexed(incoming, "factors")
    core = _shape(incoming.get("weight.core"))
    weights = _shape(incoming.get("weight.weights"))
    if cores and all(len(c) == 4 for c in cores):
        ranks = (cores[0][0], *(c[3] for c in cores))
        outs, ins = tuple(c[1] for c in cores), tuple(c[2] for c in cores)
        return f"a 'tt' weight with rank {ranks}, core out-modes {outs} and in-modes {ins}{layers}"
    modes = tuple(f[0] for f in factors if len(f) == 2)
    if core is not None:
        return f"a 'tucker' weight with rank {core} over tensor modes {modes}{layers}"
    if weights is not None and len(weights) == 1:
        return f"a 'cp' weight with rank {weights[0]} over tensor modes {modes}{layers}"
    return f"tensors {sorted(incoming)} that match no known factorization"
