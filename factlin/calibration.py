"""Feeding calibration batches through a model and recording its linear layers' inputs.

``calibration`` is an iterable of batches. Each batch is passed to the model as

* a ``Tensor``: ``model(batch)``;
* a ``tuple`` or ``list``: ``model(*batch)``;
* a ``Mapping`` (e.g. a tokenizer's output): ``model(**batch)``.

A bare ``Tensor`` or ``Mapping`` given as ``calibration`` itself is one batch. The model runs in eval mode
without autograd; every module's training flag is restored afterwards, and every hook removed,
even when a batch raises.

Keeping padding out of the statistics
-------------------------------------
Every row a linear layer sees is counted, padding positions included. Padding tokens are not
what a model computes on in use, so keep them out: feed batches of one sequence each (no
padding at all), or register your own forward pre-hook that drops masked rows, or pass
sequences of equal length.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._linear_like import dense_weight, is_linear_like
from ._patterns import NameMatcher, Patterns
from .errors import FactlinError, InputError, ShapeError, describe
from .input_stats import InputStats, PairedInputStats

#: With ``progress=None``, stay silent for this long; then a line at most this often.
_PROGRESS_DELAY_S = 2.0
_PROGRESS_EVERY_S = 2.0

__all__ = ["CalibrationError", "collect_input_stats", "run_batch", "calibration_batches"]


class CalibrationError(FactlinError):
    """A calibration batch that the model rejected, or unusable calibration data."""


def calibration_batches(calibration: object, *, reusable: bool = False) -> Iterable[Any]:
    """Check ``calibration`` and return something to iterate over.

    With ``reusable`` (several passes are needed), a one-shot iterator or generator is read
    once into a list: its batches are then all held in memory.

    Raises
    ------
    TypeError
        If ``calibration`` is None, a string or not iterable.
    """
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]  # one batch (e.g. a tokenizer's output), not its keys
    if (
        calibration is None
        or isinstance(calibration, (str, bytes))
        or not isinstance(calibration, Iterable)
    ):
        raise TypeError(
            f"calibration={describe(calibration)}: expected an iterable of batches (Tensors, "
            "tuples/lists of arguments, or Mappings of keyword arguments)"
        )
    if reusable and isinstance(calibration, Iterator):
        return list(calibration)
    return calibration


def run_batch(model: nn.Module, batch: object) -> Any:
    """Call ``model`` on one calibration batch (see the module docstring)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        f"calibration batch {describe(batch)}: expected a Tensor (model(batch)), a tuple or "
        "list (model(*batch)) or a Mapping (model(**batch))"
    )


def linear_layers(
    model: nn.Module,
    include: Optional[Patterns] = None,
    exclude: Optional[Patterns] = None,
) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` (or Hugging Face ``Conv1D``) of ``model`` matching the filters,
    under its first qualified name."""
    includes = None if include is None else NameMatcher("include", include)
    excludes = None if exclude is None else NameMatcher("exclude", exclude)
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_linear_like(module):
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    out = {}
    for key, all_names in names.items():
        if includes is not None and includes.first_match(all_names) is None:
            continue
        if excludes is not None and excludes.first_match(all_names) is not None:
            continue
        out[all_names[0]] = modules[key]
    return out


class _Progress:
    """True: a line on stderr per batch; None: silent for ``_PROGRESS_DELAY_S``, then a line
    at most every ``_PROGRESS_EVERY_S``; False: silent."""

    def __init__(self, progress: Optional[bool], what: str) -> None:
        self.enabled = progress
        self.what = what
        self.start = self.last = time.perf_counter()

    def step(self, index: int) -> None:
        now = time.perf_counter()
        if self.enabled is False:
            return
        if self.enabled is None and (
            now - self.start < _PROGRESS_DELAY_S or now - self.last < _PROGRESS_EVERY_S
        ):
            return
        self.last = now
        sys.stderr.write(f"factlin: {self.what}: batch {index + 1} ({now - self.start:.1f} s)\n")
        sys.stderr.flush()


def _input_of(name: str, module: nn.Module, args: tuple) -> torch.Tensor:
    """The input tensor of a linear call, checked against the layer's size."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer {name!r} was called with {describe(x)}, not a tensor")
    in_features = int(dense_weight(module).shape[1])
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ShapeError(
            f"layer {name!r} got inputs of shape {tuple(x.shape)}, but its in_features is "
            f"{in_features}"
        )
    if not torch.isfinite(x).all():
        raise InputError(f"layer {name!r}: its calibration inputs contain NaN or inf values")
    return x


def _run_all(
    model: nn.Module,
    calibration: Iterable[Any],
    hooks: Mapping[nn.Module, Callable[[nn.Module, tuple], None]],
    progress: Optional[bool],
    what: str,
    after_batch: Optional[Callable[[int, Any], None]] = None,
) -> int:
    """Run every batch with the given forward pre-hooks; restore the model whatever happens.

    Returns the number of batches. ``after_batch(index, batch)`` runs after each batch (inside
    the hooks' lifetime).
    """
    flags = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    log = _Progress(progress, what)
    count = 0
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(calibration):
                if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
                    raise TypeError(
                        f"calibration batch {index} is {describe(batch)}: expected a Tensor "
                        "(model(batch)), a tuple or list (model(*batch)) or a Mapping "
                        "(model(**batch))"
                    )
                try:
                    run_batch(model, batch)
                    if after_batch is not None:
                        after_batch(index, batch)
                except (CalibrationError, InputError, ShapeError) as exc:
                    raise type(exc)(f"calibration batch {index}: {exc}") from exc
                except Exception as exc:
                    raise CalibrationError(
                        f"calibration batch {index}: the model raised {type(exc).__name__}: {exc}"
                    ) from exc
                count += 1
                log.step(index)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    if count == 0:
        raise CalibrationError("calibration is empty: expected at least one batch")
    return count


def collect_input_stats(
    model: nn.Module,
    calibration: Iterable[Any],
    include: Optional[Patterns] = None,
    exclude: Optional[Patterns] = None,
    progress: Optional[bool] = None,
) -> dict[str, InputStats]:
    """Input statistics of every matched ``nn.Linear`` of ``model`` over calibration batches.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode without autograd; its training flags are restored afterwards.
    calibration : iterable of batches
        See :mod:`factlin.calibration`: Tensors (``model(batch)``), tuples or lists
        (``model(*batch)``) or Mappings (``model(**batch)``); a single Tensor is one batch.
        Padding positions count as rows: see the module docstring to keep them out.
    include, exclude : glob string, compiled regex or list of them, optional
        Which linear layers to record, by qualified name, as in :func:`factlin.tensorize_model`.
    progress : bool or None, default None
        True: a line per batch on stderr; False: silent; None: silent for ~2 s, then a line
        per batch.

    Returns
    -------
    dict of str to InputStats
        One entry per matched layer (its first qualified name), in ``named_modules`` order. A
        layer the model never called has ``count == 0``; a layer called several times per
        forward accumulates every call.

    Raises
    ------
    TypeError
        If ``model`` is not a module or ``calibration`` not an iterable.
    ValueError
        If ``calibration`` is empty, a layer's inputs do not match its ``in_features`` or hold
        NaN/inf (naming the layer), or the model rejects a batch (the model's error with the
        batch index, chained); hooks are removed and the model is unchanged.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> stats = collect_input_stats(model, [torch.randn(32, 8) for _ in range(4)])
    >>> {name: s.count for name, s in stats.items()}
    {'0': 128, '2': 128}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={describe(model)}: expected a torch.nn.Module")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress={describe(progress)}: expected True, False or None")
    batches = calibration_batches(calibration)
    layers = linear_layers(model, include, exclude)
    stats = {
        name: InputStats(int(dense_weight(m).shape[1]), device=m.weight.device)
        for name, m in layers.items()
    }

    def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            stats[name].update(_input_of(name, module, args), name=f"inputs of layer {name!r}")

        return hook

    _run_all(
        model,
        batches,
        {module: hook_for(name) for name, module in layers.items()},
        progress,
        "collecting input statistics",
    )
    return stats


def call_order(model: nn.Module, batch: object, layers: Mapping[str, nn.Module]) -> list[list[str]]:
    """The layers of ``layers`` in the order ``model`` first calls them on ``batch``, grouped:
    layers whose first call receives the very same input tensor (e.g. the query, key and value
    projections of an attention block) form one group. Layers never called are left out."""
    seen: dict[str, tuple[int, int]] = {}
    inputs: list[torch.Tensor] = []  # kept alive so that ids stay unique during the pass

    def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if name in seen:
                return
            x = _input_of(name, module, args)
            for k, previous in enumerate(inputs):
                if previous is x:
                    seen[name] = (len(seen), k)
                    return
            inputs.append(x)
            seen[name] = (len(seen), len(inputs) - 1)

        return hook

    _run_all(
        model,
        [batch],
        {module: hook_for(name) for name, module in layers.items()},
        False,
        "recording the layer order",
    )
    groups: dict[int, list[str]] = {}
    for name, (_, tensor_index) in sorted(seen.items(), key=lambda item: item[1][0]):
        groups.setdefault(tensor_index, []).append(name)
    return list(groups.values())


def collect_paired_stats(
    dense: nn.Module,
    compressed: nn.Module,
    calibration: Iterable[Any],
    names: Sequence[str],
    progress: Optional[bool] = None,
) -> dict[str, PairedInputStats]:
    """Inputs of the layers ``names`` in ``dense`` and in ``compressed`` (the same model with
    some layers already converted) over the same batches, paired row by row.

    Each batch runs through both models; the calls of a layer are paired in order.
    """
    dense_layers = {name: dense.get_submodule(name) for name in names}
    compressed_layers = {name: compressed.get_submodule(name) for name in names}
    stats = {
        name: PairedInputStats(int(dense_weight(m).shape[1]), device=m.weight.device)
        for name, m in dense_layers.items()
    }
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def capture(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            captured[name].append(_input_of(name, module, args))

        return hook

    def pair(index: int, batch: object) -> None:
        # the dense model has just run this batch (hooks filled `captured`); run the other one
        dense_inputs = {name: list(xs) for name, xs in captured.items()}
        for xs in captured.values():
            xs.clear()
        handles = [
            module.register_forward_pre_hook(capture(name))
            for name, module in compressed_layers.items()
        ]
        flags = [(m, m.training) for m in compressed.modules()]
        try:
            compressed.eval()
            run_batch(compressed, batch)
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in flags:
                module.training = flag
        for name in names:
            xs, ys = dense_inputs[name], captured[name]
            if len(xs) != len(ys):
                raise CalibrationError(
                    f"layer {name!r} was called {len(xs)} time(s) by the dense model but "
                    f"{len(ys)} by the compressed one on the same batch"
                )
            for x, y in zip(xs, ys):
                stats[name].update(x, y, name=f"inputs of layer {name!r}")
            ys.clear()

    _run_all(
        dense,
        calibration,
        {module: capture(name) for name, module in dense_layers.items()},
        progress,
        "collecting paired input statistics",
        after_batch=pair,
    )
    return stats
