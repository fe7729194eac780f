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
    layer: nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Mapping,
    tltorch: bool = False,
) -> None:
    """Raise :class:`StateDictMismatchError` if ``state_dict`` was saved from another config.

    Only the entries under ``prefix`` are looked at; nothing is raised when there are none.
    ``tltorch``: the entries were renamed from tltorch's key layout (the message says so).
    The message names the settings that differ, with both values, and no other.
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
                f"state_dict{_where(prefix)} was saved from {_describe(saved, differing)}, but "
                f"this layer is {_describe(mine, differing)}: they differ in "
                f"{', '.join(differing)}. Build the layer with the saved configuration before "
                "loading"
            )
        return
    # No metadata (e.g. a plain dict, or tltorch's): compare the tensors' names and shapes.
    expected = {
        name: tuple(tensor.shape)
        for name, tensor in (*layer.named_parameters(), *layer.named_buffers())
    }
    problems = []
    for name, value in incoming.items():
        shape = _shape(value)
        if name.startswith("weight.") and name not in expected:
            problems.append(f"unexpected tensor {name!r}")
        elif name in expected and shape is not None and shape != expected[name]:
            problems.append(f"{name!r} has shape {shape}, expected {expected[name]}")
    if not problems:
        return
    layout = " (tltorch's key layout)" if tltorch else ""
    held = _structure({name: _shape(value) for name, value in incoming.items()})
    own = _structure(expected)
    if held is None or own is None:
        raise StateDictMismatchError(
            f"state_dict{_where(prefix)}{layout} holds tensors {sorted(incoming)} that match no "
            "known factorization layout (factlin's: weight.weights and weight.factors.<k> for "
            "CP, weight.core and weight.factors.<k> for Tucker, weight.cores.<k> for TT; "
            "tltorch's: weight.factors.factor_<k>); "
            f"{'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}"
        )
    differing = [f for f in _STRUCTURE_FIELDS if held[f] is not None and held[f] != own[f]]
    if not differing:  # the same configuration, with extra or odd tensors
        raise StateDictMismatchError(
            f"state_dict{_where(prefix)}{layout} holds {_held(held, [])} like this layer, but "
            f"{'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}"
        )
    names = [_STRUCTURE_NAMES[f] for f in differing]
    raise StateDictMismatchError(
        f"state_dict{_where(prefix)}{layout} holds {_held(held, differing)}, but this layer is "
        f"{_own(own, differing)}: they differ in {', '.join(names)}. Build the layer with the "
        "configuration the state_dict was saved from before loading"
    )


#: What the tensors alone tell about a layer, and how a message names each.
_STRUCTURE_FIELDS = ("factorization", "rank", "modes", "n_layers")
_STRUCTURE_NAMES = {
    "factorization": "factorization",
    "rank": "rank",
    "modes": "tensorized shape",
    "n_layers": "n_layers",
}


def _is_layer_key(name: str) -> bool:
    return name == "bias" or name.startswith("weight.")


def _normalize(value: object) -> object:
    """Tuples and lists compare equal (metadata may come back with either)."""
    if isinstance(value, (tuple, list)):
        return tuple(_normalize(v) for v in value)
    return value


def _where(prefix: str) -> str:
    return f" (at {prefix[:-1]!r})" if prefix else ""


def _describe(config: Mapping[str, Any], fields: list[str]) -> str:
    """``a '<factorization>' layer with`` the ``fields`` among the others (factorization aside)."""
    parts = []
    for field in fields:
        if field == "rank":
            parts.append(f"rank {config.get('rank')!r}")
        elif field != "factorization":
            parts.append(f"{field}={_normalize(config.get(field, 1))}")
    text = f"a {config.get('factorization')!r} layer"
    return text + (" with " + " and ".join(parts) if parts else "")


def _modes_text(structure: Mapping[str, Any]) -> str:
    modes = structure["modes"]
    if structure["factorization"] == "tt":
        return f"core out-modes {modes[0]} and in-modes {modes[1]}"
    return f"tensor modes {modes}"


def _held(structure: Mapping[str, Any], differing: list[str]) -> str:
    """The state_dict's side: its factorization and rank always (what it holds), the rest when
    it differs."""
    text = f"a {structure['factorization']!r} weight with rank {structure['rank']!r}"
    if "modes" in differing:
        text += f" over {_modes_text(structure)}"
    if "n_layers" in differing:
        text += f" and n_layers={structure['n_layers']}"
    return text


def _own(structure: Mapping[str, Any], differing: list[str]) -> str:
    """This layer's side: only what differs."""
    text = f"a {structure['factorization']!r} layer"
    parts = []
    if "rank" in differing:
        parts.append(f"rank {structure['rank']!r}")
    if "modes" in differing:
        parts.append(_modes_text(structure))
    if "n_layers" in differing:
        parts.append(f"n_layers={structure['n_layers']}")
    return text + (" with " + " and ".join(parts) if parts else "")


def _shape(value: object) -> Optional[tuple[int, ...]]:
    if isinstance(value, tuple):
        return value
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _indexed(shapes: Mapping[str, Any], name: str) -> list[tuple[int, ...]]:
    """Shapes of ``weight.<name>.<k>`` for k = 0, 1, ... (a ParameterList)."""
    pattern = re.compile(rf"weight\.{name}\.(\d+)$")
    found = {int(m.group(1)): v for k, v in shapes.items() if (m := pattern.match(k))}
    return [found[k] for k in sorted(found) if found[k] is not None]


def _structure(shapes: Mapping[str, Optional[tuple[int, ...]]]) -> Optional[dict[str, Any]]:
    """Factorization, rank, tensor modes (TT: core out- and in-modes) and, from a 2-D bias,
    ``n_layers`` of a layer's tensors given by name and shape; None if they fit no layout."""
    bias = shapes.get("bias")
    n_layers = bias[0] if bias is not None and len(bias) == 2 else None
    cores = _indexed(shapes, "cores")
    factors = _indexed(shapes, "factors")
    core = shapes.get("weight.core")
    weights = shapes.get("weight.weights")
    base = {"n_layers": n_layers}
    if cores and all(len(c) == 4 for c in cores):
        ranks = (cores[0][0], *(c[3] for c in cores))
        modes = (tuple(c[1] for c in cores), tuple(c[2] for c in cores))
        return {**base, "factorization": "tt", "rank": ranks, "modes": modes}
    modes = tuple(f[0] for f in factors if len(f) == 2)
    if core is not None and factors:
        return {**base, "factorization": "tucker", "rank": core, "modes": modes}
    if weights is not None and len(weights) == 1 and factors:
        return {**base, "factorization": "cp", "rank": weights[0], "modes": modes}
    return None
