"""Compressed models as artifacts: save them, and load them into the dense model's skeleton.

:func:`save_pretrained` writes a directory holding

* ``factlin_config.json``: the format version, factlin's version and, per factorized layer, its
  qualified names, factorization, tensorized shapes, resolved ranks, ``n_layers``, bias,
  implementation and dtype (plus counts for ``factlin inspect``);
* the model's whole ``state_dict``: ``model.safetensors`` when the ``safetensors`` package is
  installed (tensors shared between keys, as tied weights are, are stored once), else
  ``model.pt``, readable with ``torch.load(..., weights_only=True)``;
* its buffers outside the ``state_dict`` (``persistent=False``, e.g. BERT's ``position_ids``),
  if any, in ``buffers.safetensors`` / ``buffers.pt``: a skeleton built on the ``meta`` device
  has no values for them.

:func:`from_pretrained` takes the dense model's skeleton (built from its own config: randomly
initialized, or on the ``meta`` device), puts a :class:`FactorizedLinear` of the recorded
structure in place of every listed layer -- no decomposition and no random initialization,
the new layers are built on the ``meta`` device -- and loads the weights strictly. The same
rebuilding serves ``tensorize_model(model, structure=report)``, from a
:class:`~factlin.ConversionReport` or its ``to_dict()`` (:func:`rebuild_structure`).

Layers are named by their qualified names (``model.named_modules()``). A joint layer
(``n_layers > 1``) is recorded with the names of its :class:`SubFactorizedLinear` views, each
of which replaces a dense layer of the skeleton.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ._linear_like import dense_weight, kind_of, kind_of_layer, remember_kind
from ._validation import check_implementation
from .errors import FactlinError, describe
from .factorizations import normalize_factorization
from .layer import _SKIP_RANDOM_INIT, FactorizedLinear, SubFactorizedLinear

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "rebuild_structure",
    "read_config",
    "PretrainedError",
    "FORMAT_VERSION",
    "CONFIG_NAME",
]

#: Version of the directory layout and of ``factlin_config.json``; readers refuse newer ones.
FORMAT_VERSION = 1
#: The structure file.
CONFIG_NAME = "factlin_config.json"
#: The weights files, by format.
WEIGHTS_NAMES = {"safetensors": "model.safetensors", "torch": "model.pt"}
#: The model's buffers that are not in its ``state_dict`` (``persistent=False``), by format:
#: a skeleton built on the meta device gets them from there.
BUFFERS_NAMES = {"safetensors": "buffers.safetensors", "torch": "buffers.pt"}
#: safetensors metadata key of the ``{alias: stored key}`` map of shared tensors.
_ALIASES_KEY = "factlin_aliases"

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


class PretrainedError(FactlinError):
    """A saved model that does not fit the skeleton, or a config this factlin cannot read."""


# --------------------------------------------------------------------------------------------
# Layer specifications
# --------------------------------------------------------------------------------------------
@dataclass
class _Member:
    """A :class:`SubFactorizedLinear` view of a joint layer: its names and index."""

    names: list[str]
    index: int


@dataclass
class _LayerSpec:
    """What is needed to build one :class:`FactorizedLinear` without decomposing anything.

    ``None`` for ``bias``, ``dtype`` or ``implementation``: take it from the dense layer
    replaced (or the caller's default)."""

    names: list[str]
    shape: tuple[int, int]
    factorization: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    rank: Any
    n_layers: int = 1
    bias: Optional[bool] = None
    implementation: Optional[str] = None
    checkpointing: bool = False
    dtype: Optional[torch.dtype] = None
    members: list[_Member] = field(default_factory=list)

    @property
    def label(self) -> str:
        names = self.names or [m.names[0] for m in self.members]
        return repr(names[0]) if names else "(unnamed)"


def _ints(where: str, key: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise PretrainedError(f"{where}: {key}={describe(value)}; expected a list of positive ints")
    return tuple(int(v) for v in value)


def _spec_from_dict(entry: object, where: str) -> Optional[_LayerSpec]:
    """A spec from a record of ``factlin_config.json`` or of ``ConversionReport.to_dict()``
    (None for a record of a layer that was not converted)."""
    if not isinstance(entry, Mapping):
        raise PretrainedError(f"{where}: expected a mapping of layer fields, got {describe(entry)}")
    if entry.get("skipped") is not None or entry.get("converted") is False:
        return None
    for key in ("factorization", "in_tensorized_features", "out_tensorized_features", "rank"):
        if entry.get(key) is None:
            raise PretrainedError(f"{where}: the {key!r} field is missing")
    name = entry.get("name")
    names = ([] if name is None else [name]) + list(entry.get("aliases", ()))
    if not all(isinstance(n, str) for n in names):
        raise PretrainedError(f"{where}: names {names!r} must be strings")
    in_shape = _ints(where, "in_tensorized_features", entry["in_tensorized_features"])
    out_shape = _ints(where, "out_tensorized_features", entry["out_tensorized_features"])
    rank = entry["rank"]
    rank = tuple(rank) if isinstance(rank, list) else rank
    try:
        factorization = normalize_factorization(entry["factorization"])
    except (TypeError, ValueError) as exc:
        raise PretrainedError(f"{where}: {exc}") from None
    dtype = entry.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise PretrainedError(f"{where}: dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    members = [
        _Member(names=[m["name"], *m.get("aliases", ())], index=int(m["index"]))
        for m in entry.get("members", ())
    ]
    n_layers = int(entry.get("n_layers", 1))
    if not names and not members:
        raise PretrainedError(f"{where}: a layer without any name")
    return _LayerSpec(
        names=names,
        shape=(math.prod(out_shape), math.prod(in_shape)),
        factorization=factorization,
        in_shape=in_shape,
        out_shape=out_shape,
        rank=rank,
        n_layers=n_layers,
        bias=entry.get("bias"),
        implementation=entry.get("implementation"),
        checkpointing=bool(entry.get("checkpointing", False)),
        dtype=None if dtype is None else _DTYPES[dtype],
        members=members,
    )


def _specs(structure: object) -> list[_LayerSpec]:
    """Layer specs from a ``ConversionReport``, its ``to_dict()``, a ``factlin_config.json``
    mapping, or a list of layer records."""
    from .convert import ConversionReport

    if isinstance(structure, ConversionReport):
        entries: object = [record.to_dict() for record in structure.layers]
    elif isinstance(structure, Mapping) and "layers" in structure:
        entries = structure["layers"]
    else:
        entries = structure
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)):
        raise TypeError(
            f"structure={describe(structure)}: expected a ConversionReport, its to_dict(), or "
            "the contents of factlin_config.json"
        )
    specs = [_spec_from_dict(entry, f"layer {k}") for k, entry in enumerate(entries)]
    return [spec for spec in specs if spec is not None]


# --------------------------------------------------------------------------------------------
# Rebuilding the structure
# --------------------------------------------------------------------------------------------
def _lookup(root: nn.Module, name: str) -> Optional[nn.Module]:
    if name == "":
        return root
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _dense_target(root: nn.Module, name: str, spec: _LayerSpec) -> nn.Module:
    """The dense layer of the skeleton at ``name``, checked against ``spec``."""
    module = _lookup(root, name)
    if module is None:
        raise PretrainedError(
            f"layer {name!r} ({spec.shape[0]}x{spec.shape[1]}, out x in) of the saved structure "
            "is not in the model: build the model from the same configuration as the one saved"
        )
    if kind_of(module) is None:
        raise PretrainedError(
            f"layer {name!r} of the model is a {type(module).__name__}, but the saved structure "
            f"has a factorized {spec.shape[0]}x{spec.shape[1]} (out x in) layer there; expected "
            "an nn.Linear or Conv1D to replace"
        )
    shape = tuple(int(n) for n in dense_weight(module).shape)
    if shape != spec.shape:
        raise PretrainedError(
            f"layer {name!r} is {shape[0]}x{shape[1]} (out x in) in the model but "
            f"{spec.shape[0]}x{spec.shape[1]} in the saved structure: build the model from the "
            "same configuration as the one saved"
        )
    return module


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def rebuild_structure(
    model: nn.Module,
    structure: object,
    *,
    implementation: Optional[str] = None,
    meta: bool = False,
    random_init: bool = True,
) -> tuple[nn.Module, list[tuple[_LayerSpec, nn.Module, nn.Module]]]:
    """Replace the dense layers named in ``structure`` by :class:`FactorizedLinear` layers of
    the recorded shapes and ranks, in place, without decomposing anything.

    Parameters
    ----------
    model : torch.nn.Module
        The dense skeleton; modified in place (the returned model is a new module only when
        ``model`` itself is a replaced layer).
    structure : ConversionReport, dict or list
        A report, its ``to_dict()``, or the contents of ``factlin_config.json``.
    implementation : str, optional
        Forward implementation of every new layer; default: the recorded one, else ``'auto'``.
    meta : bool, default False
        Build the new layers on the ``meta`` device (nothing allocated) instead of the dense
        layer's device.
    random_init : bool, default True
        Initialize the new layers randomly (as the constructor does); False leaves them
        uninitialized (``torch.empty``), for a ``load_state_dict`` right after.

    Returns
    -------
    model : torch.nn.Module
    built : list of (spec, new layer, dense layer replaced)

    Raises
    ------
    PretrainedError
        A recorded layer missing from ``model``, of another size, or not a linear layer; all
        checked before anything is replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={describe(model)}: expected a torch.nn.Module")
    if implementation is not None:
        implementation = check_implementation(implementation)
    specs = _specs(structure)
    # ---- every check first ----------------------------------------------------------------
    plans = []
    for spec in specs:
        if spec.n_layers > 1 and not spec.members:
            raise PretrainedError(
                f"layer {spec.label} is a joint layer (n_layers={spec.n_layers}) without "
                "SubFactorizedLinear views: no dense layer of the model corresponds to it"
            )
        members = [name for member in spec.members for name in member.names]
        dense_names = spec.names if spec.n_layers == 1 else members
        denses = [_dense_target(model, name, spec) for name in dense_names]
        for name in spec.names if spec.n_layers > 1 else ():
            parent = name.rpartition(".")[0]
            if name == "" or _lookup(model, parent) is None:
                raise PretrainedError(f"joint layer {name!r}: its parent is not in the model")
        plans.append((spec, denses))
    # ---- build ----------------------------------------------------------------------------
    built = []
    root = model
    for spec, denses in plans:
        first = denses[0]
        weight = dense_weight(first)
        dtype = spec.dtype if spec.dtype is not None else weight.dtype
        bias = spec.bias if spec.bias is not None else getattr(first, "bias", None) is not None
        impl = implementation or spec.implementation or "auto"
        device = torch.device("meta") if meta else weight.device
        token = _SKIP_RANDOM_INIT.set(not random_init or device.type == "meta")
        try:
            layer = FactorizedLinear(
                spec.in_shape, spec.out_shape, bias=bias, factorization=spec.factorization,
                rank=spec.rank, implementation=impl, n_layers=spec.n_layers,
                checkpointing=spec.checkpointing, device=device, dtype=dtype,
            )  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise PretrainedError(f"layer {spec.label}: {exc}") from None
        finally:
            _SKIP_RANDOM_INIT.reset(token)
        if _plain(layer.rank) != _plain(spec.rank):
            raise PretrainedError(
                f"layer {spec.label}: the recorded rank {spec.rank!r} resolves to {layer.rank!r} "
                f"for a {spec.factorization!r} layer of these shapes; the record is inconsistent"
            )
        layer.train(first.training)
        if not first.weight.requires_grad:
            layer.weight.requires_grad_(False)
        if spec.n_layers == 1:
            remember_kind(layer, first)
            for name in spec.names:
                if name == "":
                    root = layer
                else:
                    _set_submodule(model, name, layer)
        else:
            for name in spec.names:
                _set_submodule(model, name, layer)
            for member in spec.members:
                view = SubFactorizedLinear(layer, member.index)
                for name in member.names:
                    _set_submodule(model, name, view)
        built.append((spec, layer, first))
    return root, built


def _plain(rank: Any) -> Any:
    return tuple(rank) if isinstance(rank, (list, tuple)) else rank


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def _safetensors() -> Any:
    """The ``safetensors.torch`` module, or None when the package is not installed."""
    try:
        import safetensors.torch
    except ImportError:
        return None
    return safetensors.torch


def _factorized_layers(model: nn.Module) -> list[dict]:
    """The config records of every FactorizedLinear of ``model``."""
    layers: dict[int, tuple[FactorizedLinear, list[str]]] = {}
    views: dict[int, tuple[SubFactorizedLinear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FactorizedLinear):
            parent_name, _, child = name.rpartition(".")
            parent = _lookup(model, parent_name) if name else None
            through_view = isinstance(parent, SubFactorizedLinear) and child == "main"
            entry = layers.setdefault(id(module), (module, []))
            if not through_view:
                entry[1].append(name)
        elif isinstance(module, SubFactorizedLinear):
            views.setdefault(id(module), (module, []))[1].append(name)
    records = []
    for layer, names in layers.values():
        members = [
            {"name": view_names[0], "aliases": view_names[1:], "index": view.index}
            for view, view_names in views.values()
            if view.main is layer
        ]
        reference = layer.weight_reference
        n_bias = 0 if layer.bias is None else layer.bias.numel()
        dense = layer.n_layers * layer.in_features * layer.out_features + n_bias
        rank = layer.rank
        records.append({
            "name": names[0] if names else None,
            "aliases": names[1:],
            "module_type": kind_of_layer(layer) if layer.n_layers == 1 else "joint",
            "shape": [layer.out_features, layer.in_features],
            "factorization": layer.factorization,
            "in_tensorized_features": list(layer.in_tensorized_features),
            "out_tensorized_features": list(layer.out_tensorized_features),
            "rank": list(rank) if isinstance(rank, tuple) else rank,
            "n_layers": layer.n_layers,
            "bias": layer.bias is not None,
            "implementation": layer.implementation,
            "checkpointing": layer.checkpointing,
            "dtype": str(reference.dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in layer.parameters()),
            "dense_params": dense,
            "members": members,
        })  # fmt: skip
    return records


def _unique_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """Contiguous tensors with each shared tensor kept once, and ``{alias: kept key}``."""
    kept: dict[tuple, str] = {}
    storages: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        identity = (
            tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype,
        )  # fmt: skip
        if tensor.numel() and identity in kept:
            aliases[key] = kept[identity]
            continue
        kept[identity] = key
        pointer = tensor.untyped_storage().data_ptr()
        shares = tensor.numel() > 0 and pointer in storages
        storages.add(pointer)
        # another view of a stored tensor, or a strided one: a copy of its own
        tensors[key] = tensor.clone() if shares else tensor.contiguous()
    return tensors, aliases


def _write(path: str, state: Mapping[str, torch.Tensor], safetensors: Any) -> None:
    """``state`` to ``path``: safetensors (with ``safetensors.torch`` given) or torch.save."""
    if safetensors is None:
        torch.save(dict(state), path)
        return
    unique, aliases = _unique_state(state)
    tensors = {key: t.detach().cpu() for key, t in unique.items()}
    safetensors.save_file(tensors, path, metadata={_ALIASES_KEY: json.dumps(aliases)})


def save_pretrained(
    model: nn.Module, directory: Union[str, os.PathLike], weights_format: Optional[str] = None
) -> str:
    """Write ``model``'s factorized structure and weights to ``directory``.

    Parameters
    ----------
    model : torch.nn.Module
        A model holding :class:`FactorizedLinear` layers (e.g. from :func:`tensorize_model`).
    directory : str or path
        Created if needed; ``factlin_config.json`` and the weights file there are overwritten.
    weights_format : {'safetensors', 'torch'}, optional
        ``model.safetensors`` or ``model.pt``; default: safetensors when the package is
        installed, else torch.

    Returns
    -------
    str
        The path of the weights file written.

    Raises
    ------
    TypeError, ValueError
        ``model`` not a module, a bad ``weights_format``, ``'safetensors'`` without the
        package, or a model with no parameter on a real device (meta tensors cannot be saved).

    Examples
    --------
    >>> small, report = tensorize_model(model, rank=0.2, progress=False)
    >>> save_pretrained(small, 'compressed')  # doctest: +SKIP
    'compressed/model.safetensors'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={describe(model)}: expected a torch.nn.Module")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory={describe(directory)}: expected a path")
    backend = _safetensors()
    if weights_format is None:
        weights_format = "safetensors" if backend is not None else "torch"
    if weights_format not in WEIGHTS_NAMES:
        raise FactlinError(
            f"weights_format={weights_format!r}; expected one of {sorted(WEIGHTS_NAMES)} or None"
        )
    if weights_format == "safetensors" and backend is None:
        raise FactlinError(
            "weights_format='safetensors' needs the safetensors package: pip install safetensors"
        )
    state = model.state_dict()
    meta = [key for key, t in state.items() if isinstance(t, torch.Tensor) and t.is_meta]
    if meta:
        raise FactlinError(
            f"the model has tensors on the meta device ({', '.join(meta[:3])}"
            f"{', ...' if len(meta) > 3 else ''}): load or initialize them before saving"
        )
    from . import __version__

    buffers = {
        name: buffer
        for name, buffer in model.named_buffers(remove_duplicate=False)
        if name not in state and not buffer.is_meta
    }
    parameters = {id(p): p.numel() for p in model.parameters()}
    config = {
        "format_version": FORMAT_VERSION,
        "factlin_version": __version__,
        "weights_file": WEIGHTS_NAMES[weights_format],
        "buffers_file": BUFFERS_NAMES[weights_format] if buffers else None,
        "model_params": sum(parameters.values()),
        "layers": _factorized_layers(model),
    }
    os.makedirs(directory, exist_ok=True)
    for name in (*WEIGHTS_NAMES.values(), *BUFFERS_NAMES.values()):  # no stale files
        stale = os.path.join(os.fspath(directory), name)
        if os.path.exists(stale):
            os.remove(stale)
    path = os.path.join(os.fspath(directory), WEIGHTS_NAMES[weights_format])
    _write(path, state, backend if weights_format == "safetensors" else None)
    if buffers:
        buffers_path = os.path.join(os.fspath(directory), BUFFERS_NAMES[weights_format])
        _write(buffers_path, buffers, backend if weights_format == "safetensors" else None)
    with open(os.path.join(os.fspath(directory), CONFIG_NAME), "w") as stream:
        json.dump(config, stream, indent=2)
        stream.write("\n")
    return path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def read_config(directory: Union[str, os.PathLike]) -> dict:
    """The contents of ``directory/factlin_config.json``, checked.

    Raises
    ------
    FileNotFoundError
        No config there (the message names the path).
    PretrainedError
        Not a factlin config, or a newer format version than this factlin reads.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory={describe(directory)}: expected a path")
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: expected a directory written by factlin.save_pretrained"
        )
    with open(path) as stream:
        try:
            config = json.load(stream)
        except json.JSONDecodeError as exc:
            raise PretrainedError(f"{path} is not valid JSON: {exc}") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int) or not isinstance(config.get("layers"), list):
        raise PretrainedError(f"{path} is not a factlin config (no format_version or layers)")
    if version > FORMAT_VERSION:
        from . import __version__

        raise PretrainedError(
            f"{path} has format_version {version}, newer than this factlin ({__version__}) "
            f"reads ({FORMAT_VERSION}); it was written by factlin "
            f"{config.get('factlin_version', '?')}: upgrade factlin"
        )
    return config


def _load_state(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: the weights file of the saved model")
    if path.endswith(".safetensors"):
        backend = _safetensors()
        if backend is None:
            raise FactlinError(f"{path} needs the safetensors package: pip install safetensors")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as stream:
            metadata = stream.metadata() or {}
        state = backend.load_file(path, device=str(device))
        for alias, key in json.loads(metadata.get(_ALIASES_KEY, "{}")).items():
            state[alias] = state[key]
        return state
    return torch.load(path, map_location=device, weights_only=True)


def _parameter_ties(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, attribute) groups that hold one and the same parameter."""
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                groups.setdefault(id(param), []).append((module, attr))
    return [group for group in groups.values() if len(group) > 1]


def _restore_buffers(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Saved values for the non-persistent buffers still on the meta device (a skeleton built
    there); the skeleton's own buffers elsewhere are kept."""
    for name, value in saved.items():
        owner_name, _, attr = name.rpartition(".")
        owner = _lookup(model, owner_name)
        current = None if owner is None else owner._buffers.get(attr)
        if current is not None and current.is_meta and tuple(current.shape) == tuple(value.shape):
            owner._buffers[attr] = value


def _default_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def from_pretrained(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    implementation: Optional[str] = None,
) -> nn.Module:
    """Load a model written by :func:`save_pretrained` into the dense model's skeleton.

    The layers listed in ``factlin_config.json`` are replaced by :class:`FactorizedLinear`
    layers of the recorded structure, built on the ``meta`` device (no decomposition, no
    random initialization), then the whole ``state_dict`` is loaded strictly by assignment: the
    model's tensors become the loaded ones. On a ``meta`` skeleton nothing dense is ever
    allocated. Parameters tied in the skeleton (same object under several names) stay tied.

    Parameters
    ----------
    model : torch.nn.Module
        The dense model, built from its configuration (random weights, or on the meta device
        with ``with torch.device('meta'):``); modified in place.
    directory : str or path
        Written by :func:`save_pretrained`.
    device : str or torch.device, optional
        Where the weights are loaded; default: the device of the skeleton's tensors (CPU for
        a meta skeleton).
    implementation : str, optional
        Forward implementation of every factorized layer; default: the recorded ones.

    Returns
    -------
    torch.nn.Module
        ``model`` with the saved weights (a new module only if ``model`` itself was a saved
        factorized layer).

    Raises
    ------
    FileNotFoundError
        A missing config or weights file (the path is named).
    PretrainedError
        A saved layer missing from the skeleton, or of another size (both shapes named); a
        newer format version; a buffer the file does not hold left on the meta device.
    RuntimeError
        From ``load_state_dict``: missing or unexpected keys (the skeleton differs elsewhere).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={describe(model)}: expected a torch.nn.Module")
    config = read_config(directory)
    target = torch.device(device) if device is not None else _default_device(model)
    weights_file = config.get("weights_file", WEIGHTS_NAMES["safetensors"])
    path = os.path.join(os.fspath(directory), weights_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: the weights file of the saved model")
    ties = _parameter_ties(model)
    root, _ = rebuild_structure(
        model, config, implementation=implementation, meta=True, random_init=False
    )
    state = _load_state(path, target)
    root.load_state_dict(state, strict=True, assign=True)
    for group in ties:  # assignment gave each name its own Parameter: tie them again
        module, attr = group[0]
        shared = module._parameters[attr]
        for other, other_attr in group[1:]:
            other._parameters[other_attr] = shared
    buffers_file = config.get("buffers_file")
    if buffers_file is not None and any(b.is_meta for b in root.buffers()):
        _restore_buffers(
            root, _load_state(os.path.join(os.fspath(directory), buffers_file), target)
        )
    left = [name for name, t in (*root.named_parameters(), *root.named_buffers()) if t.is_meta]
    if left:
        raise PretrainedError(
            f"{len(left)} tensors are still on the meta device after loading ("
            f"{', '.join(left[:3])}{', ...' if len(left) > 3 else ''}): the saved model has no "
            "values for them (buffers outside the state_dict, persistent=False, that it did not "
            "have); build the skeleton on a real device, or create them before from_pretrained"
        )
    return root


# --------------------------------------------------------------------------------------------
# tensorize_model(structure=...)
# --------------------------------------------------------------------------------------------
def structure_conversion(
    model: nn.Module, structure: object, *, implementation: str, inplace: bool
) -> tuple[nn.Module, Any]:
    """``tensorize_model(model, structure=...)``: :func:`rebuild_structure` on ``model`` (or a
    deep copy), the new layers randomly initialized (nothing is allocated on ``meta``), and a
    :class:`~factlin.ConversionReport` of the result (every other linear layer skipped)."""
    import copy
    import time

    from .convert import ConversionReport, LayerRecord, _linear_groups, _module_params

    start = time.perf_counter()
    root = model if inplace else copy.deepcopy(model)
    groups = _linear_groups(root)
    before = _module_params(root)
    params_before = {id(module): _module_params(module) for module, _ in groups}
    root, built = rebuild_structure(root, structure, implementation=implementation)
    replaced = {id(dense): layer for _, layer, dense in built}
    records = []
    for module, names in groups:
        layer = replaced.get(id(module))
        out_features, in_features = (int(n) for n in dense_weight(module).shape)
        record = LayerRecord(
            name=names[0], aliases=tuple(names[1:]), shape=(out_features, in_features),
            params_before=params_before[id(module)], params_after=params_before[id(module)],
        )  # fmt: skip
        if layer is None:
            record.skipped = "not in the structure"
        else:
            record.in_tensorized_features = layer.in_tensorized_features
            record.out_tensorized_features = layer.out_tensorized_features
            record.factorization = layer.factorization
            record.rank = layer.rank
            record.params_after = _module_params(layer)
        records.append(record)
    report = ConversionReport(
        layers=records,
        seconds=time.perf_counter() - start,
        model_params_before=before,
        model_params_after=_module_params(root),
    )
    return root, report
